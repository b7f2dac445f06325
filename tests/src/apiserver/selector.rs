//! Label and field selectors: parsing the query-string syntax and matching JSON objects.
//!
//! Owns the `labelSelector` grammar (equality, existence, `in`/`notin`, `>`/`<`) and the
//! `fieldSelector` grammar (`path=value`, `path==value`, `path!=value` on any dotted path), and
//! [`ObjectFilter`], the namespace + selectors test a list or a watch applies. Pure: no I/O.

use std::collections::BTreeSet;

use serde_json::Value;

/// Why a selector string does not parse; the text goes to the client in a 400 `Status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A label selector that does not follow the grammar.
    #[error("unable to parse requirement: {0}")]
    Label(String),
    /// A field selector that does not follow the grammar.
    #[error("invalid field selector: {0}")]
    Field(String),
}

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LabelRequirement {
    key: String,
    op: LabelOp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    Equals(String),
    NotEquals(String),
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
    GreaterThan(i64),
    LessThan(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Equals,
    DoubleEquals,
    NotEquals,
    Bang,
    Open,
    Close,
    Comma,
    Greater,
    Less,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')
}

fn tokenize(input: &str) -> Result<Vec<Token>, SelectorError> {
    let mut tokens = Vec::new();
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            ',' => Token::Comma,
            '(' => Token::Open,
            ')' => Token::Close,
            '>' => Token::Greater,
            '<' => Token::Less,
            '=' if chars.peek() == Some(&'=') => {
                chars.next();
                Token::DoubleEquals
            }
            '=' => Token::Equals,
            '!' if chars.peek() == Some(&'=') => {
                chars.next();
                Token::NotEquals
            }
            '!' => Token::Bang,
            c if is_word_char(c) => {
                let mut word = String::from(c);
                while let Some(&next) = chars.peek() {
                    if !is_word_char(next) {
                        break;
                    }
                    word.push(next);
                    chars.next();
                }
                Token::Word(word)
            }
            other => {
                return Err(SelectorError::Label(format!(
                    "invalid character {other:?} in {input:?}"
                )));
            }
        };
        tokens.push(token);
    }
    Ok(tokens)
}

struct Parser<'a> {
    input: &'a str,
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        token
    }

    fn error(&self, what: &str) -> SelectorError {
        SelectorError::Label(format!("{what} in {:?}", self.input))
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        match self.next() {
            Some(Token::Word(word)) => Ok(word),
            _ => Err(self.error("expected a label key")),
        }
    }

    /// An optional value: `a=` is a valid requirement on the empty value.
    fn value(&mut self) -> String {
        match self.peek() {
            Some(Token::Word(word)) => {
                let word = word.clone();
                self.pos += 1;
                word
            }
            _ => String::new(),
        }
    }

    fn number(&mut self) -> Result<i64, SelectorError> {
        match self.next() {
            Some(Token::Word(word)) => word.parse().map_err(|_| self.error("expected an integer")),
            _ => Err(self.error("expected an integer")),
        }
    }

    fn set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        if self.next() != Some(Token::Open) {
            return Err(self.error("expected '(' after in/notin"));
        }
        let mut values = BTreeSet::new();
        loop {
            values.insert(self.value());
            match self.next() {
                Some(Token::Comma) => {}
                Some(Token::Close) => break,
                _ => return Err(self.error("expected ',' or ')' in a value set")),
            }
        }
        if values.len() == 1 && values.contains("") {
            return Err(self.error("for 'in', 'notin' operators, values set can't be empty"));
        }
        Ok(values)
    }

    fn requirement(&mut self) -> Result<LabelRequirement, SelectorError> {
        if self.peek() == Some(&Token::Bang) {
            self.pos += 1;
            return Ok(LabelRequirement {
                key: self.key()?,
                op: LabelOp::DoesNotExist,
            });
        }
        let key = self.key()?;
        let op = match self.peek() {
            None | Some(Token::Comma) => LabelOp::Exists,
            Some(Token::Equals | Token::DoubleEquals) => {
                self.pos += 1;
                LabelOp::Equals(self.value())
            }
            Some(Token::NotEquals) => {
                self.pos += 1;
                LabelOp::NotEquals(self.value())
            }
            Some(Token::Greater) => {
                self.pos += 1;
                LabelOp::GreaterThan(self.number()?)
            }
            Some(Token::Less) => {
                self.pos += 1;
                LabelOp::LessThan(self.number()?)
            }
            Some(Token::Word(word)) if word == "in" => {
                self.pos += 1;
                LabelOp::In(self.set()?)
            }
            Some(Token::Word(word)) if word == "notin" => {
                self.pos += 1;
                LabelOp::NotIn(self.set()?)
            }
            Some(_) => return Err(self.error(&format!("unexpected token after key {key:?}"))),
        };
        Ok(LabelRequirement { key, op })
    }
}

impl LabelSelector {
    /// Parses the `labelSelector` query syntax; the empty string selects everything.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut parser = Parser {
            input,
            tokens: tokenize(input)?,
            pos: 0,
        };
        let mut requirements = Vec::new();
        if parser.tokens.is_empty() {
            return Ok(Self { requirements });
        }
        loop {
            requirements.push(parser.requirement()?);
            match parser.next() {
                None => break,
                Some(Token::Comma) => {}
                Some(_) => return Err(parser.error("expected ',' between requirements")),
            }
        }
        Ok(Self { requirements })
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.requirements.iter().all(|req| {
            let value = label(&req.key);
            match &req.op {
                LabelOp::Equals(want) => value == Some(want.as_str()),
                LabelOp::NotEquals(want) => value != Some(want.as_str()),
                LabelOp::In(set) => value.is_some_and(|v| set.contains(v)),
                LabelOp::NotIn(set) => !value.is_some_and(|v| set.contains(v)),
                LabelOp::Exists => value.is_some(),
                LabelOp::DoesNotExist => value.is_none(),
                LabelOp::GreaterThan(n) => value
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                LabelOp::LessThan(n) => value
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

/// A parsed `fieldSelector`: every term must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<FieldTerm>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    path: Vec<String>,
    value: String,
    negated: bool,
}

/// Splits on unescaped `sep`, keeping escapes (`\,`) in the parts.
fn split_unescaped(input: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in input.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(&input[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&input[start..]);
    parts
}

fn unescape(value: &str) -> Result<String, SelectorError> {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(e @ ('\\' | ',' | '=')) => out.push(e),
            other => {
                return Err(SelectorError::Field(format!(
                    "invalid escape \\{other:?} in {value:?}"
                )));
            }
        }
    }
    Ok(out)
}

impl FieldSelector {
    /// Parses the `fieldSelector` query syntax; the empty string selects everything.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        if input.trim().is_empty() {
            return Ok(Self { terms });
        }
        for term in split_unescaped(input, ',') {
            let (path, value, negated) = if let Some((path, value)) = term.split_once("!=") {
                (path, value, true)
            } else if let Some((path, value)) = term.split_once("==") {
                (path, value, false)
            } else if let Some((path, value)) = term.split_once('=') {
                (path, value, false)
            } else {
                return Err(SelectorError::Field(format!(
                    "{term:?}: expected path=value"
                )));
            };
            let path = path.trim();
            if path.is_empty() || path.split('.').any(str::is_empty) {
                return Err(SelectorError::Field(format!("{term:?}: empty field path")));
            }
            terms.push(FieldTerm {
                path: path.split('.').map(str::to_owned).collect(),
                value: unescape(value.trim())?,
                negated,
            });
        }
        Ok(Self { terms })
    }

    /// Whether every term holds; a missing field compares as the empty string.
    pub fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|term| {
            let actual = field_value(object, &term.path);
            (actual == term.value) != term.negated
        })
    }
}

/// A field as the API server compares it: strings as they are, numbers and booleans printed.
fn field_value(object: &Value, path: &[String]) -> String {
    let mut current = object;
    for segment in path {
        match current.get(segment) {
            Some(next) => current = next,
            None => return String::new(),
        }
    }
    match current {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Bool(_) | Value::Number(_) => current.to_string(),
        Value::Array(_) | Value::Object(_) => current.to_string(),
    }
}

/// Which objects a list or a watch returns: namespace (if the path named one) and selectors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ObjectFilter {
    pub(crate) namespace: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

impl ObjectFilter {
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let in_namespace = match &self.namespace {
            Some(ns) => {
                object
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    == Some(ns.as_str())
            }
            None => true,
        };
        in_namespace && self.labels.matches(object) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(labels: Value) -> Value {
        json!({ "metadata": { "name": "x", "namespace": "default", "labels": labels }, "spec": { "nodeName": "n1", "port": 80 } })
    }

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn label_selector_table() {
        let web = obj(json!({ "app": "web", "tier": "front", "weight": "7" }));
        let db = obj(json!({ "app": "db" }));
        let none = json!({ "metadata": { "name": "bare" } });
        // (selector, matches web, matches db, matches unlabelled)
        let cases = [
            ("", true, true, true),
            ("app=web", true, false, false),
            ("app==web", true, false, false),
            ("app = web", true, false, false),
            ("app!=web", false, true, true),
            ("tier", true, false, false),
            ("!tier", false, true, true),
            ("app in (web,db)", true, true, false),
            ("app in (web, cache)", true, false, false),
            ("app notin (web)", false, true, true),
            ("app=web,tier=front", true, false, false),
            ("app=web,tier=back", false, false, false),
            ("app in (web,db),!tier", false, true, false),
            ("weight>5", true, false, false),
            ("weight<5", false, false, false),
            ("example.com/role", false, false, false),
            ("app=", false, false, false),
        ];
        for (s, w, d, n) in cases {
            let selector = sel(s);
            assert_eq!(selector.matches(&web), w, "{s:?} on web");
            assert_eq!(selector.matches(&db), d, "{s:?} on db");
            assert_eq!(selector.matches(&none), n, "{s:?} on unlabelled");
        }
    }

    #[test]
    fn empty_value_matches_empty_label() {
        assert!(sel("app=").matches(&obj(json!({ "app": "" }))));
        assert!(sel("example.com/role=edge").matches(&obj(json!({ "example.com/role": "edge" }))));
    }

    #[test]
    fn bad_label_selectors_are_errors() {
        for bad in [
            "app in web",
            "app in ()",
            "app in (a",
            "=web",
            "app=web,",
            "app web",
            "a>b",
            "app=w@b",
            "!",
        ] {
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad:?} should not parse"
            );
        }
        let err = LabelSelector::parse("app in web").unwrap_err();
        assert!(
            err.to_string().contains("unable to parse requirement"),
            "{err}"
        );
    }

    #[test]
    fn field_selector_table() {
        let pod = obj(json!({}));
        let cases = [
            ("", true),
            ("metadata.name=x", true),
            ("metadata.name==x", true),
            ("metadata.name!=x", false),
            ("metadata.namespace=default,spec.nodeName=n1", true),
            ("metadata.namespace=default,spec.nodeName=n2", false),
            ("spec.nodeName!=n2", true),
            ("spec.port=80", true),
            ("spec.missing=", true),
            ("spec.missing!=", false),
            ("spec.missing=x", false),
        ];
        for (s, want) in cases {
            let selector = FieldSelector::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            assert_eq!(selector.matches(&pod), want, "{s:?}");
        }
    }

    #[test]
    fn field_selector_escapes() {
        let object = json!({ "metadata": { "name": "a,b=c" } });
        assert!(
            FieldSelector::parse(r"metadata.name=a\,b\=c")
                .unwrap()
                .matches(&object)
        );
        assert!(FieldSelector::parse(r"metadata.name=a\x").is_err());
        assert!(FieldSelector::parse("metadata.name").is_err());
        assert!(FieldSelector::parse("=x").is_err());
        assert!(FieldSelector::parse("spec..x=1").is_err());
    }

    #[test]
    fn object_filter_checks_namespace() {
        let filter = ObjectFilter {
            namespace: Some("kube-system".into()),
            ..Default::default()
        };
        assert!(!filter.matches(&obj(json!({}))));
        let filter = ObjectFilter {
            namespace: Some("default".into()),
            labels: sel("app=web"),
            ..Default::default()
        };
        assert!(filter.matches(&obj(json!({ "app": "web" }))));
        assert!(!filter.matches(&obj(json!({ "app": "db" }))));
    }
}
