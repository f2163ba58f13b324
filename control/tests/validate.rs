//! `outriderctl validate`, the real binary: every error of a file in one run with "did you
//! mean" suggestions, tabs, indentation, numbers and addresses said in plain words, warnings
//! for likely mistakes and `--strict`, standard input and directories. Exact output and exit
//! codes: this is what an operator reads.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A directory removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "outriderctl-validate-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    /// Writes `text` to `name` in the directory; its path.
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `outriderctl validate ARGS` with `stdin` on its standard input.
fn validate(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outriderctl"))
        .arg("validate")
        .args(args)
        .env_remove("OUTRIDER_VALIDATE_STRICT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

/// `validate -f` on `text` written to `name`: exit code, stdout, stderr with the file's path
/// replaced by `name`.
fn validate_file(name: &str, text: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let dir = Dir::new();
    let path = dir.write(name, text);
    let mut args = vec!["-f", path.as_str()];
    args.extend(extra);
    let out = validate(&args, "");
    let show = |bytes: &[u8]| String::from_utf8_lossy(bytes).replace(&path, name);
    (out.status.code(), show(&out.stdout), show(&out.stderr))
}

#[test]
fn every_error_of_a_file_in_one_run_with_suggestions() {
    let (code, stdout, stderr) = validate_file(
        "shop.yaml",
        "services:
  orders:
    endpoints: [127.0.0.1:9101]
    endpiont: 127.0.0.1:9102
    timeout: { connect: 1s }
routes:
  - match: { authority: shop }
    service: orderz
",
        &[],
    );
    assert_eq!(code, Some(1));
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "error: services.orders.endpiont: unknown field `endpiont`; did you mean `endpoints`?
  --> shop.yaml:4:5
  |
4 |     endpiont: 127.0.0.1:9102
  |     ^
error: services.orders.timeout: unknown field `timeout`; did you mean `timeouts`?
  --> shop.yaml:5:5
  |
5 |     timeout: { connect: 1s }
  |     ^
error: routes[0].service: unknown service `orderz`; did you mean `orders`?
  --> shop.yaml:8:14
  |
8 |     service: orderz
  |              ^
shop.yaml: 3 errors
"
    );
}

#[test]
fn a_tab_is_named_as_a_tab() {
    let (code, _, stderr) = validate_file(
        "tab.yaml",
        "services:\n  orders:\n\tendpoints: [127.0.0.1:9101]\n",
        &[],
    );
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr,
        "error: tab character used for indentation; YAML needs spaces
  --> tab.yaml:3:1
  |
3 | →endpoints: [127.0.0.1:9101]
  | ^
tab.yaml: 1 error
"
    );
}

#[test]
fn bad_indentation_names_the_levels_it_misses() {
    let (code, _, stderr) = validate_file(
        "indent.yaml",
        "services:\n  orders:\n    endpoints: [127.0.0.1:9101]\n   listen: 127.0.0.1:9001\n",
        &[],
    );
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr,
        "error: bad indentation: this line is indented 3 spaces, which lines up with no block \
         above it (their keys are indented 4 (line 3), 2 (line 2), 0 (line 1)); YAML nests by \
         indentation, so indent a key exactly as far as the keys beside it
  --> indent.yaml:4:4
  |
4 |    listen: 127.0.0.1:9001
  |    ^
indent.yaml: 1 error
"
    );
}

#[test]
fn a_negative_weight_and_a_host_name_app_say_what_is_needed() {
    let (code, _, stderr) = validate_file(
        "values.yaml",
        "services:
  orders: { endpoints: [127.0.0.1:9101] }
routes:
  - match: { authority: shop }
    split:
      - service: orders
        weight: -10
inbound:
  app: localhost:8080
",
        &[],
    );
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr,
        "error: routes[0].split[0].weight: must be a whole number from 0 to 4294967295 (found `-10`)
  --> values.yaml:7:17
  |
7 |         weight: -10
  |                 ^
error: inbound.app: needs an IP address and port, e.g. 127.0.0.1:8080 or [::1]:8080 (found `localhost:8080`); host names are not resolved here
  --> values.yaml:9:8
  |
9 |   app: localhost:8080
  |        ^
values.yaml: 2 errors
"
    );
}

const LIKELY_MISTAKES: &str = "services:
  orders: { endpoints: [] }
  unused: { endpoints: [127.0.0.1:9102] }
routes:
  - match: { authority: shop }
    service: orders
    timeouts: { request: 1s, per_try: 2s }
  - match: { authority: Shop }
    service: orders
";

#[test]
fn likely_mistakes_are_warnings_and_strict_refuses_them() {
    let (code, stdout, stderr) = validate_file("mistakes.yaml", LIKELY_MISTAKES, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let hash = outrider_config::content_hash(LIKELY_MISTAKES);
    assert_eq!(
        stdout,
        format!("mistakes.yaml: valid (sha256 {hash}), 4 warnings\n")
    );
    let warnings = [
        "services.orders.endpoints: is empty: every request to this service is answered 503 \
         (no endpoints)
  --> mistakes.yaml:2:13
  |
2 |   orders: { endpoints: [] }
  |             ^
",
        "services.unused: no route sends to this service and it has no `listen` port, so no \
         request reaches it
  --> mistakes.yaml:3:3
  |
3 |   unused: { endpoints: [127.0.0.1:9102] }
  |   ^
",
        "routes[0].timeouts.per_try: per_try (2s) is longer than request (1s): the request \
         timeout always ends an attempt first, so per_try never applies and no attempt is \
         retried after a per-try timeout
  --> mistakes.yaml:7:39
  |
7 |     timeouts: { request: 1s, per_try: 2s }
  |                                       ^
",
        "routes[1].match: never matches: routes[0] takes every request this route would \
         first (it is as specific and earlier, or more specific; see the precedence of matches)
  --> mistakes.yaml:8:5
  |
8 |   - match: { authority: Shop }
  |     ^
",
    ];
    let expected: String = warnings.iter().map(|w| format!("warning: {w}")).collect();
    assert_eq!(stderr, expected);

    let (code, stdout, stderr) = validate_file("mistakes.yaml", LIKELY_MISTAKES, &["--strict"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout, "");
    let mut expected: String = warnings
        .iter()
        .map(|w| format!("error (--strict): {w}"))
        .collect();
    expected.push_str("mistakes.yaml: 4 warnings, refused by --strict\n");
    assert_eq!(stderr, expected);
}

#[test]
fn standard_input_and_directories_are_read() {
    let valid = "services:\n  orders: { endpoints: [127.0.0.1:9101] }\nroutes:\n  - match: { authority: shop }\n    service: orders\n";
    let hash = outrider_config::content_hash(valid);
    let out = validate(&["-f", "-"], valid);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("<stdin>: valid (sha256 {hash})\n")
    );

    let dir = Dir::new();
    dir.write("a.yaml", valid);
    dir.write(
        "b.yml",
        "services:\n  orders: { endpoints: [127.0.0.1:9101], lisen: 1 }\n",
    );
    dir.write("notes.txt", "not a policy");
    let shown = dir.0.display().to_string();
    let out = validate(&["-f", &shown], "");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{shown}/a.yaml: valid (sha256 {hash})\n")
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "error: services.orders.lisen: unknown field `lisen`; did you mean `listen`?
  --> {shown}/b.yml:2:42
  |
2 |   orders: {{ endpoints: [127.0.0.1:9101], lisen: 1 }}
  |                                          ^
{shown}/b.yml: 1 error
"
        )
    );

    let empty = Dir::new();
    let shown = empty.0.display().to_string();
    let out = validate(&["-f", &shown], "");
    assert_eq!(out.status.code(), Some(66));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("outriderctl: no *.yaml or *.yml files in {shown}\n")
    );
}
