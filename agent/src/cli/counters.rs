//! `ferrox counters`: the kernel programs' per-CPU verdict and drop-reason counters, summed,
//! from the pinned map (works while the agent is down).

use ferrox_datapath::{Maps, PinLayout};

use super::output::{Output, print_data, print_table};

pub fn run(layout: &PinLayout, output: Output) -> anyhow::Result<()> {
    let maps = Maps::open(layout)?;
    let rows = maps.counters.snapshot()?;
    match output {
        Output::Json | Output::Yaml => print_data(output, &rows)?,
        Output::Table => {
            let table: Vec<[String; 5]> = rows
                .iter()
                .map(|r| {
                    [
                        r.hook.into(),
                        r.verdict.into(),
                        r.reason.into(),
                        r.packets.to_string(),
                        r.bytes.to_string(),
                    ]
                })
                .collect();
            print_table(["HOOK", "VERDICT", "REASON", "PACKETS", "BYTES"], &table);
        }
    }
    Ok(())
}
