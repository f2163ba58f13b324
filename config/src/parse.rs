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
//! section (a top-level key; a service or route is first read again field by field, then that
//! field) skipped, until a pass finds no new error, [`MAX_STRUCTURAL_ERRORS`] are found or
//! [`MAX_RECOVERY_BYTES`] have been re-read. The last pass also yields the policy without its
//! broken sections ([`Partial`]), for the semantic checks. A valid policy is still parsed once,
//! and every pass runs under the same budgets.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::budget::BudgetBreach;
use serde_saphyr::granit_parser::ErrorKind;
use serde_saphyr::{
    DefaultMessageFormatter, DuplicateKeyPolicy, Error, ExternalMessageSource, MessageFormatter,
};

use crate::limits::{MAX_ALIASES, MAX_ALIAS_EXPANSION, MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_NODES};
use crate::plain;
use crate::position::PositionIndex;
use crate::{ByteSize, Diagnostic, Policy, Position, Route, Service};

/// Most structural errors reported for one document: each costs one or two more parses of it.
pub const MAX_STRUCTURAL_ERRORS: usize = 20;
/// Most bytes read again to find more structural errors: a pass over a 600 KB policy takes
/// about 100 ms in a release build, so a large broken document gets a few passes, not twenty.
pub const MAX_RECOVERY_BYTES: usize = 4 * MAX_DOCUMENT_BYTES;

/// Parses `text` into a policy (not yet validated). On failure, every structural error (up to
/// [`MAX_STRUCTURAL_ERRORS`]), in file order; a syntax error or a broken budget ends the list.
pub fn parse(text: &str) -> Result<Policy, Broken> {
    parse_one(text).map_err(|error| match error {
        Failure::Diagnostic(diagnostic) => Broken::alone(diagnostic),
        // A syntax error or a broken budget first: nothing after it can be read.
        Failure::Parse(first) if !is_structural(&first) => {
            Broken::alone(diagnostic(text, &PositionIndex::build(text), &first, None))
        }
        Failure::Parse(first) => every_structural_error(text, &first),
    })
}

/// A document with structural errors.
#[derive(Debug)]
pub struct Broken {
    /// The structural errors, in file order.
    pub diagnostics: Vec<Diagnostic>,
    /// What could be read around them, when every error was confined to a section.
    pub partial: Option<Box<Partial>>,
}

impl Broken {
    fn alone(diagnostic: Diagnostic) -> Self {
        Self {
            diagnostics: vec![diagnostic],
            partial: None,
        }
    }
}

/// The policy without its broken sections, so that semantic checks can still run on the rest:
/// a broken service is an empty placeholder (routes to it are not "unknown"), a broken route
/// is left out, a broken top-level key keeps its default.
#[derive(Debug, Default)]
pub struct Partial {
    /// The sections that parsed.
    pub policy: Policy,
    /// The index in the document of each route of `policy.routes`.
    pub route_indices: Vec<usize>,
    /// Services that are placeholders: findings about them say nothing.
    pub broken_services: Vec<String>,
}

impl Partial {
    /// The path `path` of the partial policy has in the document, or `None` if it lies in a
    /// placeholder.
    pub fn document_path(&self, path: &str) -> Option<String> {
        if let Some(rest) = path.strip_prefix("services.") {
            let broken = self.broken_services.iter().any(|name| {
                rest.strip_prefix(name.as_str())
                    .is_some_and(|after| after.is_empty() || after.starts_with('.'))
            });
            return (!broken).then(|| path.to_string());
        }
        if let Some(rest) = path.strip_prefix("routes[") {
            let (index, after) = rest.split_once(']')?;
            let original = self.route_indices.get(index.parse::<usize>().ok()?)?;
            return Some(format!("routes[{original}]{after}"));
        }
        Some(path.to_string())
    }
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

/// Reads `text` as a `T` under the policy's budgets and options (one document, duplicate keys
/// refused): for the other documents the control plane takes, Gateway API routes. The first
/// error only, with its position and path.
pub(crate) fn parse_other<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<Option<T>, Diagnostic> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(Diagnostic {
            path: String::new(),
            message: format!(
                "budget exceeded: document size is {} bytes, more than {}",
                text.len(),
                ByteSize(MAX_DOCUMENT_BYTES as u64)
            ),
            position: Some(position_of_byte(text, MAX_DOCUMENT_BYTES)),
        });
    }
    serde_saphyr::from_str_with_options::<Option<T>>(text, options())
        .map_err(|error| diagnostic(text, &PositionIndex::build(text), &error, None))
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
    /// One field of a service that is read field by field.
    ServiceField(String, String),
    /// One field of a route that is read field by field.
    RouteField(usize, String),
}

impl Section {
    fn path(&self) -> String {
        match self {
            Section::Key(key) => key.clone(),
            Section::Service(name) => format!("services.{name}"),
            Section::Route(index) => format!("routes[{index}]"),
            Section::ServiceField(name, key) => format!("services.{name}.{key}"),
            Section::RouteField(index, key) => format!("routes[{index}].{key}"),
        }
    }
}

/// Reads the document again and again, each time skipping the sections that failed before,
/// collecting one diagnostic per pass. A service or route that fails is read again field by
/// field, so that two typos in one service are two findings (a pass then finds the first
/// again: duplicates are dropped). `first` is the normal parse's error, reported alone if the
/// passes disagree with it (they should not: they deserialise the same types).
fn every_structural_error(text: &str, first: &Error) -> Broken {
    let index = PositionIndex::build(text);
    let mut skipped = HashSet::new();
    let mut by_field = HashSet::new();
    let mut diagnostics: Vec<Diagnostic> = Vec::new();
    let passes = (MAX_RECOVERY_BYTES / text.len().max(1)).clamp(1, 2 * MAX_STRUCTURAL_ERRORS);
    let mut complete = false;
    let mut partial = None;
    for _ in 0..passes {
        if diagnostics.len() >= MAX_STRUCTURAL_ERRORS {
            break;
        }
        let failed = RefCell::new(None);
        let read = RefCell::new(Partial::default());
        let checker = Checker {
            skipped: &skipped,
            by_field: &by_field,
            failed: &failed,
            partial: &read,
        };
        let Err(error) = serde_saphyr::with_deserializer_from_str_with_options(
            text,
            options(),
            |deserializer| checker.deserialize(deserializer),
        ) else {
            complete = true;
            partial = Some(Box::new(read.into_inner()));
            break;
        };
        let section = failed.into_inner();
        let found = diagnostic(text, &index, &error, section.as_ref().map(Section::path));
        if !diagnostics.contains(&found) {
            diagnostics.push(found);
        }
        match section {
            Some(section @ (Section::Service(_) | Section::Route(_)))
                if is_structural(&error) && !by_field.contains(&section) =>
            {
                by_field.insert(section);
            }
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
        diagnostics.push(diagnostic(text, &index, first, None));
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
    Broken {
        diagnostics,
        partial,
    }
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
/// sections in `skipped`, reading those in `by_field` one field at a time, noting in `failed`
/// the one being read when an error happens and in `partial` what was read.
#[derive(Clone, Copy)]
struct Checker<'a> {
    skipped: &'a HashSet<Section>,
    by_field: &'a HashSet<Section>,
    failed: &'a RefCell<Option<Section>>,
    partial: &'a RefCell<Partial>,
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
                // messages and defaults.
                _ => {
                    let read = Policy::deserialize(serde::de::value::MapAccessDeserializer::new(
                        OneEntry::new(&key, &mut map),
                    ))?;
                    // Only for the semantic checks after structural errors; a key missing
                    // here keeps its default there.
                    let mut partial = self.partial.borrow_mut();
                    let policy = &mut partial.policy;
                    match key.as_str() {
                        "workload" => policy.workload = read.workload,
                        "inbound" => policy.inbound = read.inbound,
                        "tracing" => policy.tracing = read.tracing,
                        "access_log" => policy.access_log = read.access_log,
                        "mesh_tls" => policy.mesh_tls = read.mesh_tls,
                        _ => {}
                    }
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
            let section = Section::Service(name.clone());
            let whole = !self.0.by_field.contains(&section);
            if !self.0.enter(section) {
                map.next_value::<IgnoredAny>()?;
            } else if whole {
                let service = map.next_value::<Service>()?;
                self.0
                    .partial
                    .borrow_mut()
                    .policy
                    .services
                    .insert(name.clone(), service);
            } else {
                map.next_value_seed(Fields {
                    checker: self.0,
                    of: Owner::Service(&name),
                })?;
            }
            if !whole || !self.0.partial.borrow().policy.services.contains_key(&name) {
                let mut partial = self.0.partial.borrow_mut();
                partial
                    .policy
                    .services
                    .insert(name.clone(), Service::default());
                partial.broken_services.push(name);
            }
            self.0.back_to(Some(Section::Key("services".into())));
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
            let section = Section::Route(index);
            let whole = !self.0.by_field.contains(&section);
            let more = if !self.0.enter(section) {
                seq.next_element::<IgnoredAny>()?.is_some()
            } else if whole {
                let route = seq.next_element::<Route>()?;
                let more = route.is_some();
                if let Some(route) = route {
                    let mut partial = self.0.partial.borrow_mut();
                    partial.policy.routes.push(route);
                    partial.route_indices.push(index);
                }
                more
            } else {
                seq.next_element_seed(Fields {
                    checker: self.0,
                    of: Owner::Route(index),
                })?
                .is_some()
            };
            self.0.back_to(Some(Section::Key("routes".into())));
            if !more {
                break;
            }
        }
        Ok(())
    }
}

/// Whose fields [`Fields`] reads.
#[derive(Clone, Copy)]
enum Owner<'a> {
    Service(&'a str),
    Route(usize),
}

/// A service or route read one field at a time, each through the schema type's own
/// deserialiser (a mapping of that one field), skipping the fields that failed before.
struct Fields<'a> {
    checker: Checker<'a>,
    of: Owner<'a>,
}

impl<'de> DeserializeSeed<'de> for Fields<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Fields<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let owner = match self.of {
            Owner::Service(name) => Section::Service(name.to_string()),
            Owner::Route(index) => Section::Route(index),
        };
        let mut matches = false;
        while let Some(key) = map.next_key::<String>()? {
            matches |= key == "match" || key == "matches";
            let section = match self.of {
                Owner::Service(name) => Section::ServiceField(name.to_string(), key.clone()),
                Owner::Route(index) => Section::RouteField(index, key.clone()),
            };
            if !self.checker.enter(section) {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let one = OneEntry::new(&key, &mut map);
            match self.of {
                Owner::Service(_) => {
                    Service::deserialize(serde::de::value::MapAccessDeserializer::new(one))?;
                }
                Owner::Route(_) => {
                    Route::deserialize(serde::de::value::MapAccessDeserializer::new(one))?;
                }
            }
            self.checker.back_to(Some(owner.clone()));
        }
        if matches!(self.of, Owner::Route(_)) && !matches {
            // A broken route is left out of the semantic checks, which would say the same.
            return Err(serde::de::Error::custom("needs `match` or `matches`"));
        }
        Ok(())
    }
}

/// A mapping of one entry, whose value is read from the enclosing mapping: lets a schema
/// type's derived deserialiser read a single key.
struct OneEntry<'a, A> {
    key: Option<&'a str>,
    map: &'a mut A,
}

impl<'a, A> OneEntry<'a, A> {
    fn new(key: &'a str, map: &'a mut A) -> Self {
        Self {
            key: Some(key),
            map,
        }
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for OneEntry<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let Some(key) = self.key.take() else {
            return Ok(None);
        };
        seed.deserialize(serde::de::value::StrDeserializer::new(key))
            .map(Some)
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
fn diagnostic(
    text: &str,
    index: &PositionIndex,
    error: &Error,
    section: Option<String>,
) -> Diagnostic {
    let error = innermost(error);
    let position = error.location().filter(|l| l.line() > 0).map(|l| Position {
        line: usize::try_from(l.line()).unwrap_or(usize::MAX),
        column: usize::try_from(l.column()).unwrap_or(usize::MAX),
    });
    // A visitor's own error (a value that may be a scalar or a mapping, read through
    // `deserialize_any`) carries only the root mapping's position: point at the value being
    // read instead.
    let position = match (position, section.as_deref()) {
        (Some(at), Some(section)) if !section.is_empty() && index.path_at(at) == Some("") => {
            index.find(section).or(Some(at))
        }
        _ => position,
    };
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
    if let Some(layout) = position.and_then(|p| layout_error(text, error, p)) {
        return layout;
    }
    // Name the value the error points at, as semantic findings do.
    let path = position
        .and_then(|p| index.path_at(p).map(str::to_string))
        .or(section)
        .unwrap_or_default();
    let found = position
        .map(|p| plain::scalar_at(text, p))
        .unwrap_or_default();
    Diagnostic {
        message: message(error, &path, found),
        path,
        position,
    }
}

/// A syntax error that comes from the layout of the text, said in plain words: a tab in the
/// indentation, or a line indented to no level of the blocks around it.
fn layout_error(text: &str, error: &Error, at: Position) -> Option<Diagnostic> {
    let Error::ExternalMessage { source, .. } = error else {
        return None;
    };
    let ExternalMessageSource::Parser(scan) = source.as_ref() else {
        return None;
    };
    let tab_kind = matches!(
        scan.kind(),
        ErrorKind::TabNotAllowed
            | ErrorKind::TabInBlockIndentation
            | ErrorKind::TabAtBlockScalarStart
            | ErrorKind::TabInIndentation
            | ErrorKind::TabInPlainScalar
            | ErrorKind::UnexpectedCharacter { character: '\t' }
    );
    // The scanner may stop a line later than the tab (after reading the indentation).
    if let Some(tab) = plain::tab_in_indentation(text, at.line)
        .or_else(|| plain::tab_in_indentation(text, at.line.checked_sub(1)?))
    {
        return Some(Diagnostic {
            path: String::new(),
            message: "tab character used for indentation; YAML needs spaces".into(),
            position: Some(tab),
        });
    }
    if tab_kind {
        return Some(Diagnostic {
            path: String::new(),
            message: "tab character here; YAML separates with spaces only".into(),
            position: Some(at),
        });
    }
    let indentation = matches!(
        scan.kind(),
        ErrorKind::ExpectedBlockMappingKey
            | ErrorKind::ExpectedBlockSequenceEntry
            | ErrorKind::InvalidIndentation
            | ErrorKind::MappingValueNotAllowed
            | ErrorKind::BlockSequenceEntryNotAllowed
    );
    if !indentation {
        return None;
    }
    let (message, position) = plain::indentation(text, at)?;
    Some(Diagnostic {
        path: String::new(),
        message,
        position: Some(position),
    })
}

/// Alias errors wrap the error met while replaying the alias; report that one.
fn innermost(error: &Error) -> &Error {
    let mut error = error.without_snippet();
    while let Error::AliasError { error: inner, .. } = error {
        error = inner.without_snippet();
    }
    error
}

/// What is wrong, for a human; `path` is where (possibly empty) and `found` the scalar
/// written there (possibly empty).
fn message(error: &Error, path: &str, found: &str) -> String {
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
        Error::SerdeUnknownField {
            field, expected, ..
        } => match crate::suggest::did_you_mean(field, expected.iter().copied()) {
            Some(near) => format!(
                "unknown field `{}`; did you mean `{near}`?",
                sanitize(field)
            ),
            None => format!(
                "unknown field `{}`, expected one of {}",
                sanitize(field),
                expected.join(", ")
            ),
        },
        Error::SerdeUnknownVariant {
            variant, expected, ..
        } => {
            let near = crate::suggest::did_you_mean(variant, expected.iter().copied())
                .map(|near| format!("; did you mean `{near}`?"))
                .unwrap_or_default();
            format!(
                "unknown variant `{}`, expected one of {}{near}",
                sanitize(variant),
                expected.join(", ")
            )
        }
        Error::InvalidScalar { ty, .. } => plain::scalar_type(ty, found)
            .unwrap_or_else(|| sanitize(&DefaultMessageFormatter.format_message(error))),
        Error::SerdeInvalidType { expected, .. } => plain::scalar_type(expected, found)
            .unwrap_or_else(|| sanitize(&DefaultMessageFormatter.format_message(error))),
        // `SocketAddr`'s own parse error, for endpoints, listen and inbound.app.
        Error::Message { msg, .. } if msg == "invalid socket address syntax" => {
            plain::socket_address(path, found)
        }
        other => sanitize(&DefaultMessageFormatter.format_message(other)),
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
                "services.a.endpiont: unknown field `endpiont`; did you mean `endpoints`? at \
                 p.yaml:4:5",
                "services.b.timeouts.connect: duration `5parsecs` has an unknown unit (use us, \
                 ms, s, m, h) at p.yaml:7:26",
                "services.c.protocol: unknown variant `http3`, expected one of http1, http2 at \
                 p.yaml:10:15",
                "routes[0]: needs `match` or `matches` at p.yaml:12:5",
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

    #[test]
    fn two_typos_in_one_service_are_two_errors_with_suggestions() {
        let text = "services:
  orders:
    endpoints: [127.0.0.1:1]
    endpiont: 127.0.0.1:2
    timeout: { connect: 1s }
";
        assert_eq!(
            errors(text),
            [
                "services.orders.endpiont: unknown field `endpiont`; did you mean `endpoints`? \
                 at p.yaml:4:5",
                "services.orders.timeout: unknown field `timeout`; did you mean `timeouts`? at \
                 p.yaml:5:5",
            ]
        );
    }

    #[test]
    fn semantic_errors_are_reported_beside_structural_ones() {
        let text = "services:
  orders: { endpoints: [127.0.0.1:1] }
  cart: { endpoints: [127.0.0.1:2], protocl: http1 }
routes:
  - match: { authority: orders }
    servce: orders
  - match: { authority: cart }
    service: cart
  - match: { authority: shop }
    service: orderz
";
        assert_eq!(
            errors(text),
            [
                "services.cart.protocl: unknown field `protocl`; did you mean `protocol`? at \
                 p.yaml:3:37",
                "routes[0].servce: unknown field `servce`; did you mean `service`? at p.yaml:6:5",
                "routes[2].service: unknown service `orderz`; did you mean `orders`? at \
                 p.yaml:10:14",
            ]
        );
    }

    #[test]
    fn layout_and_value_mistakes_are_said_in_plain_words() {
        let cases = [
            (
                "services:\n  orders:\n\tendpoints: [127.0.0.1:1]\n",
                "tab character used for indentation; YAML needs spaces at p.yaml:3:1",
            ),
            (
                "services:\n  orders:\n    endpoints: [127.0.0.1:1]\n   timeouts: { connect: 1s }\n",
                "bad indentation: this line is indented 3 spaces, which lines up with no block \
                 above it (their keys are indented 4 (line 3), 2 (line 2), 0 (line 1)); YAML \
                 nests by indentation, so indent a key exactly as far as the keys beside it at \
                 p.yaml:4:4",
            ),
            (
                "services:\n  orders: { endpoints: [127.0.0.1:1] }\nroutes:\n  - match: {}\n    \
                 split: [ { service: orders, weight: -10 } ]\n",
                "routes[0].split[0].weight: must be a whole number from 0 to 4294967295 (found \
                 `-10`) at p.yaml:5:41",
            ),
            (
                "inbound:\n  app: localhost:8080\n",
                "inbound.app: needs an IP address and port, e.g. 127.0.0.1:8080 or [::1]:8080 \
                 (found `localhost:8080`); host names are not resolved here at p.yaml:2:8",
            ),
            (
                "services:\n  orders: { endpoints: [orders.shop:80] }\n",
                "services.orders.endpoints[0]: needs an IP address and port, e.g. \
                 127.0.0.1:8080 or [::1]:8080 (found `orders.shop:80`); for a host name, use \
                 `dns: host:port` instead of `endpoints` at p.yaml:2:25",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(errors(text), [expected], "{text}");
        }
    }

    #[test]
    fn a_route_read_field_by_field_still_needs_its_match() {
        let text = "services:\n  a: { endpoints: [127.0.0.1:1] }\nroutes:\n  - servce: a\n";
        let found = errors(text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found
                .iter()
                .any(|e| e.starts_with("routes[0]: unknown field `servce`")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|e| e.starts_with("routes[0]: needs `match` or `matches`")),
            "{found:?}"
        );
    }

    #[test]
    fn a_section_that_is_not_a_mapping_is_one_error() {
        for text in ["services:\n  a: 3\n", "routes:\n  - 3\n"] {
            let found = errors(text);
            assert_eq!(found.len(), 1, "{text}: {found:?}");
        }
    }
}
