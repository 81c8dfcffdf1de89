//! The examples in the crate README are the reference users copy from, so they must parse.

use can_dra_api::{MemberConfig, NodeConfig};

fn yaml_blocks(text: &str) -> Vec<String> {
    text.split("```yaml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block.to_owned()))
        .collect()
}

#[test]
fn readme_examples_are_valid_documents() {
    let blocks = yaml_blocks(include_str!("../README.md"));
    assert_eq!(
        blocks.len(),
        2,
        "one MemberConfig and one NodeConfig example"
    );
    let member = MemberConfig::from_yaml_str(&blocks[0]).map(|c| c.resolve(0));
    assert!(
        matches!(member, Ok(Ok(_))),
        "MemberConfig example: {member:?}"
    );
    let node = NodeConfig::from_yaml_str(&blocks[1]);
    assert!(node.is_ok(), "NodeConfig example: {node:?}");
}
