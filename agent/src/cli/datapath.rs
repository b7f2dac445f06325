//! `ferrox datapath`: every pinned map, program and link with its kernel id and what it is
//! attached to, and each pod's filter with its program's id (works while the agent is down).

use ferrox_datapath::PinLayout;

use super::output::{Output, print_data, print_table};

pub fn run(layout: &PinLayout, output: Output) -> anyhow::Result<()> {
    let objects = ferrox_datapath::inventory(layout)?;
    match output {
        Output::Json | Output::Yaml => print_data(output, &objects)?,
        Output::Table => {
            let table: Vec<[String; 4]> = objects
                .iter()
                .map(|o| {
                    let target = match o.target {
                        Some(ferrox_datapath::LinkTarget::Cgroup { cgroup_id, .. }) => {
                            format!("cgroup id {cgroup_id}")
                        }
                        Some(ferrox_datapath::LinkTarget::Tcx { ifindex, .. }) => {
                            format!("tcx ifindex {ifindex}")
                        }
                        Some(ferrox_datapath::LinkTarget::TcFilter {
                            ifindex,
                            priority,
                            handle,
                        }) => {
                            format!("tc ingress ifindex {ifindex} (filter pref {priority} handle {handle:#x})")
                        }
                        Some(ferrox_datapath::LinkTarget::Xdp { ifindex }) => {
                            format!("xdp ifindex {ifindex}")
                        }
                        Some(ferrox_datapath::LinkTarget::Other { link_type }) => {
                            format!("link type {link_type}")
                        }
                        None => String::new(),
                    };
                    [
                        format!("{:?}", o.kind).to_lowercase(),
                        o.name.clone(),
                        o.id.to_string(),
                        target,
                    ]
                })
                .collect();
            print_table(["KIND", "NAME", "ID", "ATTACHED TO"], &table);
        }
    }
    Ok(())
}
