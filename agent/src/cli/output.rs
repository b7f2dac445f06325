//! How every CLI command prints: an aligned table for people, or the same document as JSON
//! (`-o json`, field names a stable interface) or YAML (`-o yaml`). The daemon never prints
//! through this module.

use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts; the field names are a stable interface.
    Json,
    /// The same document as YAML.
    Yaml,
}

/// The `-o/--output` flag of the commands that take nothing else.
#[derive(Debug, Args)]
pub struct OutputArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Prints `data` as the JSON or YAML document `output` asks for (the same fields either way).
pub fn print_data<T: serde::Serialize>(output: Output, data: &T) -> anyhow::Result<()> {
    match output {
        // Through a JSON value, so that both carry the very same document (serde_yaml would
        // write enums as YAML tags).
        Output::Yaml => print!("{}", serde_yaml::to_string(&serde_json::to_value(data)?)?),
        Output::Json | Output::Table => println!("{}", serde_json::to_string_pretty(data)?),
    }
    Ok(())
}

/// Prints `rows` under `header` in columns as wide as their widest cell.
pub fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
