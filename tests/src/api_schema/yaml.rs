//! Plain (unquoted) YAML scalars that kubectl reads differently from this crate's YAML parser.
//! kubectl turns YAML into JSON with YAML 1.1 rules (sigs.k8s.io/yaml), serde_yaml follows YAML
//! 1.2: `off`, `yes`, `n` are booleans to kubectl and strings here, `0644` is octal 420 to
//! kubectl and 644 here, `1_000` a number to kubectl and a string here. Such a scalar would make
//! the documents checked here differ from the ones the API server receives (`FERROX_XDP: off`
//! in a ConfigMap is a string here, and a boolean the API server rejects there), so each is
//! reported with its line, to be quoted or spelled out.
//!
//! A line scanner, not a parser: it reads `key: value`, `- value` and flow collections
//! (`[a, b]`, `{ k: v }`), skips comments and block scalars (`|`, `>`).

/// `(line number, scalar, what kubectl reads)` for every plain scalar of `text` whose YAML 1.1
/// reading is not the string (or number) serde_yaml reads.
pub fn yaml11_divergences(text: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    // Indentation of the key that opened a block scalar, while inside it.
    let mut block: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start().len();
        if let Some(b) = block {
            if line.trim().is_empty() || indent > b {
                continue;
            }
            block = None;
        }
        let code = strip_comment(line).trim_end();
        let body = code.trim_start();
        if body.is_empty() || body.starts_with("---") {
            continue;
        }
        let mut values = Vec::new();
        collect_values(body, &mut values);
        for v in values {
            if v.starts_with('|') || v.starts_with('>') {
                block = Some(indent);
                continue;
            }
            if let Some(reading) = yaml11_reading(v) {
                out.push((i + 1, v.to_owned(), reading));
            }
        }
    }
    out
}

/// The values of one line: after `- ` and `key: `, and each item of a flow collection.
fn collect_values<'a>(body: &'a str, out: &mut Vec<&'a str>) {
    let body = body.trim();
    if let Some(rest) = body.strip_prefix("- ") {
        return collect_values(rest, out);
    }
    if body == "-" || body.is_empty() {
        return;
    }
    if body.starts_with('[') || body.starts_with('{') {
        let inner = body
            .trim_start_matches(['[', '{'])
            .trim_end_matches([']', '}']);
        for item in split_flow(inner) {
            collect_values(item, out);
        }
        return;
    }
    if body.starts_with('"') || body.starts_with('\'') {
        return;
    }
    match key_value(body) {
        Some(value) => collect_values(value, out),
        None => out.push(body),
    }
}

/// The value after the first `: ` (or a trailing `:`) outside quotes.
fn key_value(body: &str) -> Option<&str> {
    let bytes = body.as_bytes();
    let mut quote = None;
    for (i, &b) in bytes.iter().enumerate() {
        match (quote, b) {
            (None, b'"' | b'\'') => quote = Some(b),
            (Some(q), _) if b == q => quote = None,
            (None, b':') if i + 1 == bytes.len() || bytes[i + 1] == b' ' => {
                return Some(&body[i + 1..]);
            }
            _ => {}
        }
    }
    None
}

/// Items of a flow collection's inside, split at top-level commas.
fn split_flow(inner: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start, mut quote) = (0usize, 0, None);
    for (i, b) in inner.bytes().enumerate() {
        match (quote, b) {
            (None, b'"' | b'\'') => quote = Some(b),
            (Some(q), _) if b == q => quote = None,
            (None, b'[' | b'{') => depth += 1,
            (None, b']' | b'}') => depth = depth.saturating_sub(1),
            (None, b',') if depth == 0 => {
                out.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&inner[start..]);
    out
}

/// `line` without its comment (a `#` after a blank, outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev = b' ';
    for (i, b) in line.bytes().enumerate() {
        match (quote, b) {
            (None, b'"' | b'\'') => quote = Some(b),
            (Some(q), _) if b == q => quote = None,
            (None, b'#') if prev == b' ' || prev == b'\t' => return &line[..i],
            _ => {}
        }
        prev = b;
    }
    line
}

/// What YAML 1.1 reads `plain` as, when that differs from YAML 1.2's reading.
fn yaml11_reading(plain: &str) -> Option<String> {
    const TRUE: [&str; 8] = ["y", "Y", "yes", "Yes", "YES", "on", "On", "ON"];
    const FALSE: [&str; 8] = ["n", "N", "no", "No", "NO", "off", "Off", "OFF"];
    if TRUE.contains(&plain) {
        return Some("the boolean true".into());
    }
    if FALSE.contains(&plain) {
        return Some("the boolean false".into());
    }
    let digits = plain.trim_start_matches(['-', '+']);
    if digits.len() > 1
        && digits.starts_with('0')
        && digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        let n = i64::from_str_radix(digits, 8).ok()?;
        return Some(format!("the octal number {n}"));
    }
    if digits.contains('_')
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'_')
        && digits.bytes().next().is_some_and(|b| b.is_ascii_digit())
    {
        return Some(format!("the number {}", digits.replace('_', "")));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::yaml11_divergences;

    #[test]
    fn finds_yaml11_only_readings_and_nothing_else() {
        let text = "\
a: off
b: \"off\"
c: 'no'
d: [on, \"yes\", x]
e: { type: string, flag: y }
f: 0644
g: 1_000
- N
# h: off
i: x # off
j: >-
  this text says: no
  yes
k: true
l: 0
m: 10
n: no-op
";
        let found: Vec<(usize, String)> = yaml11_divergences(text)
            .into_iter()
            .map(|(l, v, _)| (l, v))
            .collect();
        let want: Vec<(usize, String)> = [
            (1, "off"),
            (4, "on"),
            (5, "y"),
            (6, "0644"),
            (7, "1_000"),
            (8, "N"),
        ]
        .into_iter()
        .map(|(l, v)| (l, v.to_owned()))
        .collect();
        assert_eq!(found, want);
    }
}
