//! The policy's JSON Schema, generated from the types in `schema.rs` with `schemars` so that it
//! cannot drift from what the parser reads. The derives there follow the serde attributes
//! (`deny_unknown_fields` becomes `additionalProperties: false`, renames, defaults, enum
//! forms); this module holds the schemas of the types that deserialise by hand (durations,
//! sizes, `tls`, `access_log`) and of socket addresses, and the generator.
//!
//! What the schema says is a subset of the rules: the types, the field names, the enum values
//! and the simple bounds. What it cannot say (a route naming a service that does not exist,
//! `endpoints` and `dns` together, a duration of zero) is left to [`crate::load`]; editors
//! still point out most mistakes as they are typed. `deploy/schema/policy.json` is this
//! output, checked in (a test fails when it differs); the control plane serves it too.

use std::borrow::Cow;

use schemars::generate::SchemaSettings;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

use crate::schema::{AccessLog, AccessLogFields, ServiceTls};
use crate::{ByteSize, Duration, Policy};

/// The JSON Schema (draft-07, which every YAML language server reads) of a policy document.
pub fn policy_schema() -> serde_json::Value {
    let generator = SchemaSettings::draft07().for_deserialize().into_generator();
    let mut schema = generator.into_root_schema_for::<Policy>();
    schema.insert("title".into(), "Outrider policy".into());
    schema.to_value()
}

/// [`policy_schema`] as the text checked in at `deploy/schema/policy.json`: pretty-printed,
/// with a final newline.
pub fn policy_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&policy_schema())
        .unwrap_or_else(|e| unreachable!("a JSON value always serialises: {e}"));
    text.push('\n');
    text
}

/// A service, route, rule or workload name, as the validator accepts it.
pub(crate) const NAME: &str = r"^[A-Za-z0-9._-]{1,253}$";

/// An HTTP token (RFC 9110): a method, or a header or cookie name.
pub(crate) const TOKEN: &str = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$";

/// `workload: NAME` (or `"*"`).
pub(crate) fn workload_one(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "pattern": r"^(\*|[A-Za-z0-9._-]{1,253})$" })
}

/// `workload: [NAME, ...]`: at least one, each a name (`"*"` stands alone).
pub(crate) fn workload_many(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "uniqueItems": true,
        "items": { "type": "string", "pattern": NAME },
    })
}

/// A header or cookie name.
pub(crate) fn token(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "pattern": TOKEN })
}

/// A bare `off` is the boolean `false` to a YAML 1.1 reader (serde-saphyr's untyped values, some
/// editors); the parser reads it as the variant `off`, so the schema takes both.
pub(crate) fn off_is_false(schema: &mut Schema) {
    if let Some(variants) = schema
        .get_mut("oneOf")
        .and_then(serde_json::Value::as_array_mut)
    {
        variants.push(serde_json::json!({
            "const": false,
            "description": "`off`, as YAML 1.1 reads a bare off.",
        }));
    }
}

/// `ValueMatch` takes `exact` as another name of `value` (serde's `alias`, which the derive
/// leaves out): without it here, `additionalProperties: false` would refuse it.
pub(crate) fn exact_alias(schema: &mut Schema) {
    let Some(value) = schema.pointer("/properties/value").cloned() else {
        return;
    };
    if let Some(properties) = schema
        .get_mut("properties")
        .and_then(serde_json::Value::as_object_mut)
    {
        let mut exact = value;
        if let Some(object) = exact.as_object_mut() {
            object.insert(
                "description".into(),
                "The value, exactly (Gateway API's spelling of `value`).".into(),
            );
        }
        properties.insert("exact".into(), exact);
    }
}

/// `host:port` where the host is an IP address (v4, or v6 in brackets): what
/// `std::net::SocketAddr` parses. Port 0 and the unspecified address parse too; the validator
/// refuses them where they make no sense.
pub(crate) struct SocketAddrText;

/// An IPv4 address, each octet 0..=255 without leading zeros (as Rust parses them).
const IPV4: &str = r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
/// A port, 0..=65535 (leading zeros allowed, as Rust parses it).
const PORT: &str =
    r"0*(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0)";

impl JsonSchema for SocketAddrText {
    fn schema_name() -> Cow<'static, str> {
        "SocketAddr".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // IPv6 loosely (hex digits, colons, an embedded IPv4 and a numeric scope): its full
        // grammar as a regular expression would be unreadable, and the parser names the mistake.
        let pattern = format!(r"^({IPV4}|\[[0-9A-Fa-f:.]+(%[0-9]+)?\]):{PORT}$");
        json_schema!({
            "type": "string",
            "pattern": pattern,
            "description": "An IP address and port, e.g. 127.0.0.1:8080 or [::1]:8080 (host \
                            names go in `dns:`).",
            "examples": ["127.0.0.1:8080", "[::1]:8080"],
        })
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": r"^\s*([0-9]+(us|ms|s|m|h))+\s*$",
            "description": "A duration with a unit: us, ms, s, m or h, or a sum such as 1m30s. \
                            A bare number is an error (5 ms or 5 s?).",
            "examples": ["250ms", "2s", "1m30s"],
        })
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A size: a number of bytes, or a number with a unit (B, KiB, MiB, \
                            GiB; KB, kB, MB, GB are decimal).",
            "anyOf": [
                { "type": "string", "pattern": r"^\s*[0-9]+\s*(B|KiB|MiB|GiB|KB|kB|MB|GB)?\s*$" },
                { "type": "integer", "minimum": 0 },
            ],
            "examples": ["64KiB", "1MiB"],
        })
    }
}

impl JsonSchema for ServiceTls {
    fn schema_name() -> Cow<'static, str> {
        "ServiceTls".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let origination = generator.subschema_for::<crate::OriginationTls>();
        json_schema!({
            "description": "`mesh`: the endpoints are sidecars' inbound ports, reached over \
                            mTLS; `{ sni, ca }`: an external HTTPS service (TLS origination).",
            "oneOf": [{ "const": "mesh" }, origination],
        })
    }
}

impl JsonSchema for AccessLog {
    fn schema_name() -> Cow<'static, str> {
        "AccessLog".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let format = generator.subschema_for::<crate::AccessLogFormat>();
        let fields = generator.subschema_for::<AccessLogFields>();
        json_schema!({
            "description": "Whether and how requests are logged: `json`, `text` or `off`, or a \
                            mapping `{ format, query }` (without `format`, JSON).",
            "anyOf": [format, fields],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in schema is what the types generate.
    #[test]
    fn the_checked_in_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/schema/policy.json");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == policy_schema_text(),
            "deploy/schema/policy.json differs from what the policy types generate; \
             regenerate it with `cargo run -p outrider-control --bin outriderctl -- schema > \
             deploy/schema/policy.json`"
        );
    }
}
