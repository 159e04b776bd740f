//! Where a secret value comes from: stdin (`-`, or piped), a file (`@PATH`
//! or `--from-file PATH`), or a masked prompt on a terminal. Never from the
//! command line, where it would sit in shell history and in
//! `/proc/PID/cmdline` for anyone on the machine to read.

use std::{io::IsTerminal, io::Read, path::PathBuf};

use zeroize::Zeroizing;

use crate::failure::{Result, local};

pub enum Source {
    Stdin,
    /// A file, and whether its name may be repeated in an error: a name
    /// given after `@` is not, in case what was typed was a value.
    File(PathBuf, bool),
    Prompt,
}

/// The source an invocation names. Anything other than `-` or `@PATH` in
/// the value's place is refused without being repeated.
pub fn source(arg: Option<&str>, from_file: Option<PathBuf>) -> Result<Source> {
    match (arg, from_file) {
        (Some(_), Some(_)) => Err(local("give the value once: `-`, `@PATH` or --from-file PATH")),
        (None, Some(path)) => Ok(Source::File(path, true)),
        // `-` with a terminal as stdin would read the value with echo on.
        (Some("-"), None) if std::io::stdin().is_terminal() => Ok(Source::Prompt),
        (Some("-"), None) => Ok(Source::Stdin),
        (Some(a), None) if a.len() > 1 && a.starts_with('@') => {
            Ok(Source::File(PathBuf::from(a.get(1..).unwrap_or_default()), false))
        }
        (Some(_), None) => Err(local(
            "a value on the command line is refused: it would stay in your shell history and be visible to \
             everyone on this machine in the process list. Pass it on stdin (`-`, e.g. `secretsctl secret create \
             KEY - < file`), from a file (`@PATH` or --from-file PATH), or leave it out to be prompted for it",
        )),
        (None, None) if std::io::stdin().is_terminal() => Ok(Source::Prompt),
        (None, None) => Ok(Source::Stdin),
    }
}

/// Reads the value of `key` from `source`. From stdin, text loses one
/// trailing newline (what `echo` adds); bytes that are not text, and a
/// file, are taken as they are.
pub fn read(source: &Source, key: &str) -> Result<Zeroizing<Vec<u8>>> {
    let value = match source {
        Source::Stdin => {
            let mut buf = Zeroizing::new(Vec::new());
            std::io::stdin().read_to_end(&mut buf).map_err(|e| local(format!("reading the value from stdin: {e}")))?;
            if std::str::from_utf8(&buf).is_ok() && buf.ends_with(b"\n") {
                buf.pop();
                if buf.ends_with(b"\r") {
                    buf.pop();
                }
            }
            buf
        }
        Source::File(path, true) => Zeroizing::new(
            std::fs::read(path).map_err(|e| local(format!("reading the value from {}: {e}", path.display())))?,
        ),
        Source::File(path, false) => Zeroizing::new(std::fs::read(path).map_err(|e| {
            local(format!(
                "reading the value from the file named after `@`: {} (the name is not repeated here, in case it \
                 was a value; pass a file as `@PATH` or --from-file PATH)",
                e.kind()
            ))
        })?),
        Source::Prompt => {
            let first = Zeroizing::new(
                rpassword::prompt_password(format!("Value for {key}: "))
                    .map_err(|e| local(format!("reading the value from the terminal: {e}")))?,
            );
            let again = Zeroizing::new(
                rpassword::prompt_password("Again, to confirm: ")
                    .map_err(|e| local(format!("reading the value from the terminal: {e}")))?,
            );
            if *first != *again {
                return Err(local("the two values differ; nothing was sent"));
            }
            Zeroizing::new(first.as_bytes().to_vec())
        }
    };
    if value.is_empty() {
        return Err(local("the value is empty; nothing was sent"));
    }
    Ok(value)
}

/// Reads a credential (a Vault token, an AppRole secret id) as text, without
/// the whitespace around it that a file or `echo` leaves.
pub fn read_credential(source: &Source, what: &str) -> Result<Zeroizing<String>> {
    let bytes = read(source, what)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| local(format!("{what} is not UTF-8 text")))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(local(format!("{what} is empty; nothing was sent")));
    }
    Ok(Zeroizing::new(trimmed.to_string()))
}
