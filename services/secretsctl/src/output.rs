//! How answers are printed: a human table by default, or `-o json` /
//! `-o yaml` for scripts, with the fields documented in the README
//! (they only ever grow).

use clap::ValueEnum;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum Format {
    /// Human-readable tables and sentences
    #[default]
    Table,
    /// One JSON document
    Json,
    /// One YAML document
    Yaml,
}

/// Prints `value` as JSON or YAML, or calls `human` for the table form.
pub fn print<T: Serialize>(format: Format, value: &T, human: impl FnOnce(&T)) -> crate::failure::Result<()> {
    match format {
        Format::Table => human(value),
        Format::Json => {
            let text = serde_json::to_string_pretty(value)
                .map_err(|e| crate::failure::local(format!("encoding the answer as JSON: {e}")))?;
            outln!("{text}");
        }
        Format::Yaml => {
            let text = serde_yaml::to_string(value)
                .map_err(|e| crate::failure::local(format!("encoding the answer as YAML: {e}")))?;
            outln!("{}", text.trim_end_matches('\n'));
        }
    }
    Ok(())
}

/// Rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        outln!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// RFC 3339, or empty.
pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Writes one line of the answer to stdout. A reader that went away (`| head`)
/// ends the program quietly; any other failure to write ends it with 1.
pub fn line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing the answer: {e}");
        std::process::exit(1);
    }
}
