//! `shoal new service NAME`: writes a crate with one route, one migration,
//! one job and their tests, from `examples/rust-service/` (built into the
//! binary) with NAME in place of `greetings` (docs/services.md).

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// The example's files, as `.ci/run` builds and tests them.
const FILES: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../../examples/rust-service/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../../../examples/rust-service/src/lib.rs"),
    ),
    (
        "src/main.rs",
        include_str!("../../../examples/rust-service/src/main.rs"),
    ),
    (
        "tests/greetings.rs",
        include_str!("../../../examples/rust-service/tests/greetings.rs"),
    ),
    (
        ".gitignore",
        include_str!("../../../examples/rust-service/.gitignore"),
    ),
];

/// Names Shoal's own services take (their routes and tables).
const TAKEN: &[&str] = &[
    "accounts",
    "catalog",
    "media",
    "orders",
    "payments",
    "notifications",
    "runtime",
    "shoal",
];

const KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
    "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub",
    "ref", "return", "self", "static", "struct", "super", "trait", "true", "type", "unsafe", "use",
    "where", "while", "test", "core", "std",
];

/// Why `name` cannot be a service's name, if it cannot.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.ends_with('_')
        && !name.contains("__");
    if !ok {
        return Err(format!(
            "`{name}` must be 1-40 characters of a-z, 0-9 and single `_`, starting with a letter \
             (it names the crate, its table, its routes /api/{name} and its job kind)"
        ));
    }
    if TAKEN.contains(&name) {
        return Err(format!(
            "`{name}` is one of Shoal's own services; choose another name"
        ));
    }
    if KEYWORDS.contains(&name) {
        return Err(format!(
            "`{name}` is a Rust keyword or a standard crate's name"
        ));
    }
    Ok(())
}

/// `greetings_api` -> `GreetingsApi`.
fn camel(name: &str) -> String {
    name.split('_')
        .map(|part| {
            let mut c = part.chars();
            match c.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// The crate's files for `name`, its dependencies on Shoal's crates at
/// `shoal` (a path as written in Cargo.toml).
pub fn render(name: &str, shoal: &str) -> Vec<(String, String)> {
    FILES
        .iter()
        .map(|(path, text)| {
            let text = text
                .replace("path = \"../..", &format!("path = \"{shoal}"))
                .replace("greetings", name)
                .replace("Greetings", &camel(name));
            (path.replace("greetings", name), text)
        })
        .collect()
}

/// Writes the crate into `dir` (which must not exist yet).
pub fn write(name: &str, dir: &Path, shoal: &Path) -> anyhow::Result<Vec<PathBuf>> {
    check_name(name).map_err(anyhow::Error::msg)?;
    if dir.exists() {
        bail!("{} exists already; nothing was written", dir.display());
    }
    let shoal =
        std::path::absolute(shoal).with_context(|| format!("resolving {}", shoal.display()))?;
    if !shoal.join("crates/runtime/Cargo.toml").exists() {
        bail!(
            "{} is not a checkout of Shoal (no crates/runtime/Cargo.toml); pass --shoal PATH",
            shoal.display()
        );
    }
    let mut written = Vec::new();
    for (path, text) in render(name, &shoal.display().to_string()) {
        let file = dir.join(&path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        written.push(file);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("greetings").is_ok());
        assert!(check_name("invoice_v2").is_ok());
        for bad in [
            "",
            "Greetings",
            "2fa",
            "a-b",
            "a__b",
            "b_",
            "accounts",
            "type",
            &"x".repeat(41),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(camel("invoice_v2"), "InvoiceV2");
    }

    #[test]
    fn greetings_is_the_example_itself_and_another_name_replaces_it() {
        for (path, text) in render("greetings", "../..") {
            let example = FILES.iter().find(|(p, _)| *p == path).unwrap().1;
            assert_eq!(text, example, "{path}");
        }
        let files = render("invoices", "/opt/shoal");
        assert!(files.iter().any(|(p, _)| p == "tests/invoices.rs"));
        for (path, text) in &files {
            assert!(
                !text.contains("greetings") && !text.contains("Greetings"),
                "{path}"
            );
            assert!(!text.contains("../.."), "{path}");
        }
        let cargo = &files.iter().find(|(p, _)| p == "Cargo.toml").unwrap().1;
        assert!(cargo.contains("name = \"invoices\""));
        assert!(cargo.contains("path = \"/opt/shoal/crates/runtime\""));
        let main = &files.iter().find(|(p, _)| p == "src/main.rs").unwrap().1;
        assert!(main.contains(".module(invoices::Invoices)"));
    }
}
