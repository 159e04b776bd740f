//! The README's workload payloads, sent as printed. (The walkthrough and
//! the token hashing command run in the `readme` test binary.)

use std::process::Command;

const README: &str = include_str!("../../../README.md");

/// The README's workload payloads are the proto's JSON: grpcurl sends each
/// one as printed to SaveWorkload (validate only), and the gateway reads the
/// kind and every reference the document holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workload_payloads_in_the_readme_are_accepted_as_printed() {
    use integration_tests::{procs::grpcurl, *};
    let heading = README.find("### Workload payloads").expect("README shows the payloads");
    let rest = &README[heading..];
    let start = rest.find("```json\n").expect("a json block") + "```json\n".len();
    let block = &rest[start..start + rest[start..].find("```").unwrap()];
    let docs: Vec<serde_json::Value> =
        serde_json::Deserializer::from_str(block).into_iter().collect::<Result<_, _>>().expect("valid JSON");
    assert_eq!(docs.len(), 8, "one payload per kind");
    let app = TestApp::spawn().await;
    app.setup_domain("finance").await;
    let addr = app.gateway_url.trim_start_matches("http://").to_string();
    for doc in docs {
        let kind = doc.as_object().unwrap().keys().next().unwrap().clone();
        let references = doc.to_string().matches("secretObject").count()
            + doc.to_string().matches("${secrets.").count()
            + usize::from(kind == "storageConfig");
        let body = serde_json::json!({"domain": "finance", "id": "readme", "validateOnly": true, "payload": doc});
        let output = tokio::task::block_in_place(|| {
            Command::new(grpcurl())
                .args(["-plaintext", "-H", &format!("authorization: Bearer {}", app.token(SPARK))])
                .args(["-H", &format!("x-on-behalf-of: user:{OWNER}"), "-d", &body.to_string(), &addr])
                .arg("iomete.secrets.v1.Gateway/SaveWorkload")
                .output()
                .unwrap()
        });
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{kind}: {}{stdout}", String::from_utf8_lossy(&output.stderr));
        let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        // storageSecret wins: the plaintext secretKey is no reference.
        let expected = if kind == "storageConfig" { 1 } else { references };
        assert_eq!(answer["references"].as_array().map_or(0, Vec::len), expected, "{kind}: {stdout}");
    }
}

/// The README's Layout lists every source file of every crate under its
/// directory, and names nothing that does not exist: a file added, moved or
/// removed fails here until the map says where it went.
#[test]
fn the_layout_section_matches_the_tree() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let from = README.find("## Layout").expect("a Layout section");
    let block = &README[from..];
    let start = block.find("```\n").expect("a code block") + 4;
    let block = &block[start..start + block[start..].find("```").expect("the block ends")];
    let mut listed: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut current = None;
    for line in block.lines() {
        let name = line.split_whitespace().next().expect("a named line");
        if line.starts_with(' ') {
            let dir: &String = current.as_ref().expect("a file under a directory");
            assert!(root.join(dir).join(name).is_file(), "Layout names {dir}/{name}, which does not exist");
            listed.get_mut(dir).unwrap().push(name.to_string());
        } else {
            let dir = name.trim_end_matches('/').to_string();
            assert!(root.join(&dir).is_dir(), "Layout names {dir}, which does not exist");
            listed.insert(dir.clone(), Vec::new());
            current = Some(dir);
        }
    }
    let mut crates = 0;
    for parent in ["services", "shared"] {
        for entry in std::fs::read_dir(root.join(parent)).unwrap() {
            let src = entry.unwrap().path().join("src");
            if !src.is_dir() {
                continue;
            }
            crates += 1;
            let dir = format!("{parent}/{}/src", src.parent().unwrap().file_name().unwrap().to_string_lossy());
            let files = listed.get(&dir).unwrap_or_else(|| panic!("Layout does not list {dir}"));
            let mut pending = vec![src.clone()];
            while let Some(at) = pending.pop() {
                for entry in std::fs::read_dir(&at).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_dir() {
                        pending.push(path);
                    } else if path.extension().is_some_and(|e| e == "rs") {
                        let file = path.strip_prefix(&src).unwrap().to_string_lossy().to_string();
                        assert!(files.contains(&file), "Layout does not list {dir}/{file}");
                    }
                }
            }
        }
    }
    assert!(crates >= 9, "found {crates} crates");
}
