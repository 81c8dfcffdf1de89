//! YAML documents of a multi-document stream, each with the file it came from.

/// One YAML document: its text and where it came from (`can-dra/templates/rbac.yaml`, a file path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The chart-relative template or the file the document was read from.
    pub source: String,
    /// The document's YAML text, without the `---` separator.
    pub text: String,
}

impl Document {
    /// The document's `kind`, if it is a mapping that has one.
    pub fn kind(&self) -> Option<String> {
        self.field("kind")
    }

    /// The document's `metadata.name`, if it has one.
    pub fn name(&self) -> Option<String> {
        let value: serde_yaml::Value = serde_yaml::from_str(&self.text).ok()?;
        value
            .get("metadata")?
            .get("name")?
            .as_str()
            .map(str::to_owned)
    }

    fn field(&self, key: &str) -> Option<String> {
        let value: serde_yaml::Value = serde_yaml::from_str(&self.text).ok()?;
        value.get(key)?.as_str().map(str::to_owned)
    }
}

/// Splits a YAML stream at its `---` lines and drops documents that hold only blank lines and
/// comments (a template whose `if` rendered nothing, a stream's leading separator).
///
/// ```
/// let docs = can_dra_deploy::split_documents("---\n# nothing\n---\nkind: A\n---\nkind: B\n");
/// assert_eq!(docs, ["kind: A\n", "kind: B\n"]);
/// ```
pub fn split_documents(text: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            docs.push(std::mem::take(&mut current));
        } else {
            current.push_str(line);
        }
    }
    docs.push(current);
    docs.into_iter().filter(|d| has_content(d)).collect()
}

fn has_content(doc: &str) -> bool {
    doc.lines().any(|line| {
        let line = line.trim();
        !line.is_empty() && !line.starts_with('#')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_separator_like_text_inside_block_scalars() {
        // Only a line that is exactly `---` separates documents; indented text is content.
        let docs = split_documents("a: |\n  ---x\n  --- \nb: 1\n---\nc: 2");
        assert_eq!(docs, ["a: |\n  ---x\n  --- \nb: 1\n", "c: 2"]);
    }

    #[test]
    fn reads_kind_and_name() {
        let doc = Document {
            source: "x".into(),
            text: "kind: DeviceClass\nmetadata:\n  name: can.dra.dev\n".into(),
        };
        assert_eq!(doc.kind().as_deref(), Some("DeviceClass"));
        assert_eq!(doc.name().as_deref(), Some("can.dra.dev"));
    }
}
