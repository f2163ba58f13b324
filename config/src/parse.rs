//! Policy text to [`Policy`]: one pass of serde-saphyr with budgets, so that no document (an
//! alias bomb, 100,000 levels of nesting, a megabyte of nodes) can cost a proxy or the control
//! plane more than a bounded amount of time and memory. Every rejection is a [`Diagnostic`]
//! with a position; a broken budget is named in it.
//!
//! Aliases are allowed, within [`MAX_ALIASES`] uses and [`MAX_ALIAS_EXPANSION`] replayed
//! events: operators share a `retries:` block between services with an anchor, and the bound
//! on what aliases expand to is what keeps a billion-laughs document harmless.
//!
//! A structural error (unknown field, wrong type, missing field, bad duration) does not hide
//! the ones after it: serde stops at the first, so the document is read again with that
//! section (a top-level key, one service, one route) skipped, until a pass finds no new error,
//! [`MAX_STRUCTURAL_ERRORS`] are found or [`MAX_RECOVERY_BYTES`] have been re-read. A valid
//! policy is still parsed once, and every pass runs under the same budgets.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::budget::BudgetBreach;
use serde_saphyr::granit_parser::ErrorKind;
use serde_saphyr::{DuplicateKeyPolicy, Error, ExternalMessageSource, MessageFormatter};

use crate::limits::{MAX_ALIASES, MAX_ALIAS_EXPANSION, MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_NODES};
use crate::position::PositionIndex;
use crate::{ByteSize, Diagnostic, Policy, Position, Route, Service};

/// Most structural errors reported for one document: each costs one more parse of it.
pub const MAX_STRUCTURAL_ERRORS: usize = 20;
/// Most bytes read again to find more structural errors: a pass over a 600 KB policy takes
/// about 100 ms in a release build, so a large broken document gets a few passes, not twenty.
pub const MAX_RECOVERY_BYTES: usize = 4 * MAX_DOCUMENT_BYTES;

/// Parses `text` into a policy (not yet validated). On failure, every structural error (up to
/// [`MAX_STRUCTURAL_ERRORS`]), in file order; a syntax error or a broken budget ends the list.
pub fn parse(text: &str) -> Result<Policy, Vec<Diagnostic>> {
    parse_one(text).map_err(|error| match error {
        Failure::Diagnostic(diagnostic) => vec![diagnostic],
        // A syntax error or a broken budget first: nothing after it can be read.
        Failure::Parse(first) if !is_structural(&first) => {
            vec![diagnostic(&PositionIndex::build(text), &first, None)]
        }
        Failure::Parse(first) => every_structural_error(text, &first),
    })
}

enum Failure {
    Diagnostic(Diagnostic),
    Parse(Error),
}

fn parse_one(text: &str) -> Result<Policy, Failure> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(Failure::Diagnostic(Diagnostic {
            path: String::new(),
            message: format!(
                "budget exceeded: document size is {} bytes, more than {}",
                text.len(),
                ByteSize(MAX_DOCUMENT_BYTES as u64)
            ),
            position: Some(position_of_byte(text, MAX_DOCUMENT_BYTES)),
        }));
    }
    // `Option`: a stream with no document (empty, blank or comments only) and an explicit
    // null document both come out as `None`, which is refused below.
    match serde_saphyr::from_str_with_options::<Option<Policy>>(text, options()) {
        Ok(Some(policy)) => Ok(policy),
        Ok(None) => Err(Failure::Diagnostic(Diagnostic {
            path: String::new(),
            message: "empty document: a policy needs at least one field (to remove a policy, \
                      delete the file or use `outriderctl delete`)"
                .into(),
            position: None,
        })),
        Err(error) => Err(Failure::Parse(error)),
    }
}

/// The part of a policy a structural error is confined to: the next pass skips it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Section {
    /// A top-level key other than `services` and `routes` (or either of them when its value
    /// is not a mapping or a sequence at all).
    Key(String),
    /// One entry of `services`.
    Service(String),
    /// One entry of `routes`.
    Route(usize),
}

impl Section {
    fn path(&self) -> String {
        match self {
            Section::Key(key) => key.clone(),
            Section::Service(name) => format!("services.{name}"),
            Section::Route(index) => format!("routes[{index}]"),
        }
    }
}

/// Reads the document again and again, each time skipping the sections that failed before,
/// collecting one diagnostic per pass. `first` is the normal parse's error, reported alone if
/// the passes disagree with it (they should not: they deserialise the same types).
fn every_structural_error(text: &str, first: &Error) -> Vec<Diagnostic> {
    let index = PositionIndex::build(text);
    let mut skipped = HashSet::new();
    let mut diagnostics = Vec::new();
    let passes = (MAX_RECOVERY_BYTES / text.len().max(1)).clamp(1, MAX_STRUCTURAL_ERRORS);
    let mut complete = false;
    while diagnostics.len() < passes {
        let failed = RefCell::new(None);
        let checker = Checker {
            skipped: &skipped,
            failed: &failed,
        };
        let Err(error) = serde_saphyr::with_deserializer_from_str_with_options(
            text,
            options(),
            |deserializer| checker.deserialize(deserializer),
        ) else {
            complete = true;
            break;
        };
        let section = failed.into_inner();
        diagnostics.push(diagnostic(
            &index,
            &error,
            section.as_ref().map(Section::path),
        ));
        match section {
            Some(section) if is_structural(&error) && !skipped.contains(&section) => {
                skipped.insert(section);
            }
            _ => {
                complete = true;
                break;
            }
        }
    }
    if diagnostics.is_empty() {
        diagnostics.push(diagnostic(&index, first, None));
    }
    diagnostics.sort_by_key(|d| d.position.map(|p| (p.line, p.column)));
    if !complete {
        diagnostics.push(Diagnostic {
            path: String::new(),
            message: format!(
                "stopped after {} errors; there may be more after them",
                diagnostics.len()
            ),
            position: None,
        });
    }
    diagnostics
}

/// Errors of the schema, after which the rest of the document can still be read; syntax
/// errors, duplicate keys and broken budgets are not.
fn is_structural(error: &Error) -> bool {
    matches!(
        innermost(error),
        Error::Message { .. }
            | Error::Unexpected { .. }
            | Error::InvalidScalar { .. }
            | Error::InvalidBooleanStrict { .. }
            | Error::NullIntoString { .. }
            | Error::NonFiniteFloat { .. }
            | Error::SerdeInvalidType { .. }
            | Error::SerdeInvalidValue { .. }
            | Error::SerdeInvalidLength { .. }
            | Error::SerdeUnknownVariant { .. }
            | Error::SerdeUnknownField { .. }
            | Error::SerdeMissingField { .. }
            | Error::SerdeVariantId { .. }
            | Error::UnexpectedValueForUnit { .. }
            | Error::UnexpectedValueForUnitEnumVariant { .. }
            | Error::ExternallyTaggedEnumExpectedScalarOrMapping { .. }
            | Error::TaggedScalarCannotDeserializeIntoString { .. }
    )
}

/// Deserialises a policy section by section with the schema's own types, skipping the
/// sections in `skipped` and noting in `failed` the one being read when an error happens.
#[derive(Clone, Copy)]
struct Checker<'a> {
    skipped: &'a HashSet<Section>,
    failed: &'a RefCell<Option<Section>>,
}

impl Checker<'_> {
    fn enter(&self, section: Section) -> bool {
        if self.skipped.contains(&section) {
            return false;
        }
        self.back_to(Some(section));
        true
    }

    fn back_to(&self, section: Option<Section>) {
        *self.failed.borrow_mut() = section;
    }
}

impl<'de> DeserializeSeed<'de> for Checker<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Checker<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a policy (a mapping)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            let section = Section::Key(key.clone());
            if !self.enter(section) {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            match key.as_str() {
                "services" => map.next_value_seed(Services(self))?,
                "routes" => map.next_value_seed(Routes(self))?,
                // Any other key, known or not, through `Policy`'s own deserialiser: its
                // messages and defaults, and nothing to keep in step here.
                _ => {
                    Policy::deserialize(serde::de::value::MapAccessDeserializer::new(OneEntry {
                        key: Some(&key),
                        map: &mut map,
                    }))?;
                }
            }
            self.back_to(None);
        }
        Ok(())
    }
}

/// `services:`, one service at a time.
struct Services<'a>(Checker<'a>);

impl<'de> DeserializeSeed<'de> for Services<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Services<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of services by name")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key::<String>()? {
            if self.0.enter(Section::Service(name)) {
                map.next_value::<Service>()?;
                self.0.back_to(Some(Section::Key("services".into())));
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// `routes:`, one route at a time.
struct Routes<'a>(Checker<'a>);

impl<'de> DeserializeSeed<'de> for Routes<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Routes<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of routes")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for index in 0.. {
            let more = if self.0.enter(Section::Route(index)) {
                let more = seq.next_element::<Route>()?.is_some();
                self.0.back_to(Some(Section::Key("routes".into())));
                more
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                break;
            }
        }
        Ok(())
    }
}

/// A mapping of one entry, whose value is read from the enclosing mapping: lets `Policy`'s
/// derived deserialiser read a single top-level key.
struct OneEntry<'a, A> {
    key: Option<&'a str>,
    map: &'a mut A,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for OneEntry<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        match self.key.take() {
            Some(key) => seed
                .deserialize(serde::de::value::StrDeserializer::new(key))
                .map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            // The scanner enforces flow nesting (`[[[[...`) itself, ahead of the budget's
            // count, since it looks ahead for keys; `message` names it as the depth budget.
            flow_nesting_limit: MAX_DEPTH,
            max_nodes: MAX_NODES,
            max_events: 4 * MAX_NODES,
            max_aliases: MAX_ALIASES,
            max_anchors: MAX_ALIASES,
            max_documents: 1,
            max_total_scalar_bytes: MAX_DOCUMENT_BYTES,
            max_recorded_anchor_events: MAX_ALIAS_EXPANSION,
            max_recorded_anchor_bytes: MAX_DOCUMENT_BYTES,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_ALIAS_EXPANSION,
            max_replay_stack_depth: MAX_DEPTH,
        },
        duplicate_keys: DuplicateKeyPolicy::Error,
        with_snippet: false,
    }
}

/// The diagnostic for a document serde-saphyr refused; `section` is the path of the part of
/// the policy being read, for when the error's own position names no value.
fn diagnostic(index: &PositionIndex, error: &Error, section: Option<String>) -> Diagnostic {
    let error = innermost(error);
    let position = error.location().filter(|l| l.line() > 0).map(|l| Position {
        line: usize::try_from(l.line()).unwrap_or(usize::MAX),
        column: usize::try_from(l.column()).unwrap_or(usize::MAX),
    });
    if let Error::DuplicateMappingKey { key, .. } = error {
        // serde-saphyr names the second place only; the event walk finds both.
        if let Some(dup) = index.duplicates().first() {
            return Diagnostic {
                path: dup.path.clone(),
                message: format!(
                    "duplicate key (first at line {}, column {}; a key may appear once)",
                    dup.first.line, dup.first.column
                ),
                position: Some(dup.second),
            };
        }
        let key = key.as_deref().unwrap_or("?");
        return Diagnostic {
            path: String::new(),
            message: format!("duplicate key `{}`", sanitize(key)),
            position,
        };
    }
    // Name the value the error points at, as semantic findings do.
    let path = position
        .and_then(|p| index.path_at(p).map(str::to_string))
        .or(section)
        .unwrap_or_default();
    Diagnostic {
        path,
        message: message(error),
        position,
    }
}

/// Alias errors wrap the error met while replaying the alias; report that one.
fn innermost(error: &Error) -> &Error {
    let mut error = error.without_snippet();
    while let Error::AliasError { error: inner, .. } = error {
        error = inner.without_snippet();
    }
    error
}

fn message(error: &Error) -> String {
    match error {
        Error::Budget { breach, .. } => budget_message(breach),
        Error::AliasReplayLimitExceeded { .. } | Error::AliasExpansionLimitExceeded { .. } => {
            format!("budget exceeded: alias expansion is more than {MAX_ALIAS_EXPANSION} nodes")
        }
        Error::AliasReplayStackDepthExceeded { .. } => {
            format!("budget exceeded: aliases nest deeper than {MAX_DEPTH} levels (nesting depth)")
        }
        Error::ExternalMessage { source, .. }
            if matches!(
                source.as_ref(),
                ExternalMessageSource::Parser(scan)
                    if matches!(scan.kind(), ErrorKind::RecursionLimitExceeded)
            ) =>
        {
            budget_message(&BudgetBreach::Depth { depth: MAX_DEPTH })
        }
        other => sanitize(&serde_saphyr::DefaultMessageFormatter.format_message(other)),
    }
}

fn budget_message(breach: &BudgetBreach) -> String {
    match breach {
        BudgetBreach::Depth { .. } => {
            format!("budget exceeded: nesting depth is more than {MAX_DEPTH} levels")
        }
        BudgetBreach::Nodes { .. } | BudgetBreach::Events { .. } => {
            format!("budget exceeded: node count is more than {MAX_NODES}")
        }
        BudgetBreach::Aliases { .. } | BudgetBreach::Anchors { .. } => {
            format!("budget exceeded: alias count is more than {MAX_ALIASES}")
        }
        BudgetBreach::RecordedAnchorEvents { .. } | BudgetBreach::RecordedAnchorBytes { .. } => {
            format!("budget exceeded: alias expansion is more than {MAX_ALIAS_EXPANSION} nodes")
        }
        BudgetBreach::AliasAnchorRatio { aliases, anchors } => format!(
            "budget exceeded: alias expansion ({aliases} aliases of {anchors} anchors; at most \
             10 uses per anchor once there are 100)"
        ),
        BudgetBreach::ScalarBytes { .. } | BudgetBreach::InputBytes { .. } => format!(
            "budget exceeded: document size is more than {}",
            ByteSize(MAX_DOCUMENT_BYTES as u64)
        ),
        BudgetBreach::Documents { .. } => {
            "a policy file holds one YAML document (found a second `---`)".into()
        }
        other => format!("budget exceeded: {other:?}"),
    }
}

/// Control characters from the document would otherwise reach terminals and logs verbatim.
fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The line and column of byte `offset` (clamped to a character boundary).
fn position_of_byte(text: &str, offset: usize) -> Position {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Position {
        line: before.bytes().filter(|&b| b == b'\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match crate::load("p.yaml", text) {
            Ok(policy) => panic!("expected errors, got {policy:?}"),
            Err(error) => error.to_string().lines().map(str::to_string).collect(),
        }
    }

    #[test]
    fn every_structural_error_is_reported_with_path_and_position() {
        let text = "services:
  a:
    endpoints: [127.0.0.1:1]
    endpiont: x
  b:
    endpoints: [127.0.0.1:2]
    timeouts: { connect: 5parsecs }
  c:
    endpoints: [127.0.0.1:3]
    protocol: http3
routes:
  - service: a
  - match: { authority: a }
    service: a
tracing: 3
bogus: 1
";
        assert_eq!(
            errors(text),
            [
                "services.a.endpiont: unknown field `endpiont`, expected one of endpoints, dns, \
                 addresses, listen, protocol, load_balancing, timeouts, retries, rate_limit, \
                 circuit_breaker, outlier_detection, tls, identity at p.yaml:4:5",
                "services.b.timeouts.connect: duration `5parsecs` has an unknown unit (use us, \
                 ms, s, m, h) at p.yaml:7:26",
                "services.c.protocol: unknown variant `http3`, expected one of http1, http2 at \
                 p.yaml:10:15",
                "routes[0]: missing field `match` at p.yaml:12:5",
                "tracing: expected mapping start at p.yaml:15:10",
                "bogus: unknown field `bogus`, expected one of workload, services, routes, \
                 inbound, tracing, access_log, mesh_tls, opaque_ports at p.yaml:16:1",
            ]
        );
    }

    #[test]
    fn a_valid_section_after_a_broken_one_is_not_reported() {
        let text = "services:\n  a: { endpoints: [127.0.0.1:1], protocol: 2 }\n  b: { endpoints: [127.0.0.1:2] }\n";
        let found = errors(text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("services.a.protocol: "), "{found:?}");
    }

    #[test]
    fn anchors_of_a_broken_section_still_serve_the_next_one() {
        let text = "services:
  a:
    endpoints: [127.0.0.1:1]
    retries: &r { attempts: 2 }
    listen: nowhere
  b:
    endpoints: [127.0.0.1:2]
    retries: *r
    lisen: 127.0.0.1:9
";
        let found = errors(text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("services.a.listen: "), "{found:?}");
        assert!(
            found[1].starts_with("services.b.lisen: unknown field"),
            "{found:?}"
        );
    }

    #[test]
    fn a_syntax_error_ends_the_list() {
        let text = "services:\n  a: { endpoints: [127.0.0.1:1], bad: 1 }\n  b: { endpoints: [127.0.0.1:2]\n";
        let found = errors(text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("services.a.bad: unknown field"),
            "{found:?}"
        );
        assert_eq!(found[1], "services.b: unclosed bracket '{' at p.yaml:3:6");
    }

    #[test]
    fn a_broken_budget_after_structural_errors_is_still_named() {
        let text = format!("routes: 1\n{}", crate::tests::alias_bomb());
        let found = errors(&text);
        assert!(found[0].starts_with("routes: "), "{found:?}");
        assert!(
            found
                .last()
                .expect("two")
                .contains("budget exceeded: alias"),
            "{found:?}"
        );
    }

    #[test]
    fn the_list_is_capped() {
        let mut text = String::from("services:\n");
        for i in 0..MAX_STRUCTURAL_ERRORS + 5 {
            text.push_str(&format!(
                "  s{i}: {{ endpoints: [127.0.0.1:1], typo: 1 }}\n"
            ));
        }
        let found = errors(&text);
        assert_eq!(found.len(), MAX_STRUCTURAL_ERRORS + 1);
        assert_eq!(
            found[MAX_STRUCTURAL_ERRORS],
            "stopped after 20 errors; there may be more after them in p.yaml"
        );
    }
}
