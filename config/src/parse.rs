//! Policy text to [`Policy`]: one pass of serde-saphyr with budgets, so that no document (an
//! alias bomb, 100,000 levels of nesting, a megabyte of nodes) can cost a proxy or the control
//! plane more than a bounded amount of time and memory. Every rejection is a [`Diagnostic`]
//! with a position; a broken budget is named in it.
//!
//! Aliases are allowed, within [`MAX_ALIASES`] uses and [`MAX_ALIAS_EXPANSION`] replayed
//! events: operators share a `retries:` block between services with an anchor, and the bound
//! on what aliases expand to is what keeps a billion-laughs document harmless.

use serde_saphyr::budget::BudgetBreach;
use serde_saphyr::granit_parser::ErrorKind;
use serde_saphyr::{DuplicateKeyPolicy, Error, ExternalMessageSource, MessageFormatter};

use crate::limits::{MAX_ALIASES, MAX_ALIAS_EXPANSION, MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_NODES};
use crate::position::PositionIndex;
use crate::{ByteSize, Diagnostic, Policy, Position};

/// Parses `text` into a policy (not yet validated).
pub fn parse(text: &str) -> Result<Policy, Diagnostic> {
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
    // `Option`: a stream with no document (empty, blank or comments only) and an explicit
    // null document both come out as `None`, which is refused below.
    match serde_saphyr::from_str_with_options::<Option<Policy>>(text, options()) {
        Ok(Some(policy)) => Ok(policy),
        Ok(None) => Err(Diagnostic {
            path: String::new(),
            message: "empty document: a policy needs at least one field (to remove a policy, \
                      delete the file or use `outriderctl delete`)"
                .into(),
            position: None,
        }),
        Err(error) => Err(diagnostic(text, &error)),
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

/// The diagnostic for a document serde-saphyr refused.
fn diagnostic(text: &str, error: &Error) -> Diagnostic {
    let error = innermost(error);
    let position = error.location().filter(|l| l.line() > 0).map(|l| Position {
        line: usize::try_from(l.line()).unwrap_or(usize::MAX),
        column: usize::try_from(l.column()).unwrap_or(usize::MAX),
    });
    if let Error::DuplicateMappingKey { key, .. } = error {
        // serde-saphyr names the second place only; the event walk finds both.
        let index = PositionIndex::build(text);
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
        .and_then(|p| PositionIndex::build(text).path_at(p).map(str::to_string))
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
