//! Running the iptables tools: a deadline on each run, and their error output mapped
//! back to the rule on the line it names.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{CaptureError, Script};

/// Longest a tool may take; a netfilter transaction takes milliseconds, so this only bounds a
/// tool stuck on a lock.
const DEADLINE: Duration = Duration::from_secs(30);
/// Most output read from a tool (a saved nat table is far smaller).
const MAX_OUTPUT: u64 = 16 << 20;

/// Runs `tool args` and returns its standard output; a failure is [`CaptureError::ToolFailed`].
pub fn output(tool: &'static str, args: &[&str]) -> Result<String, CaptureError> {
    let (ok, stdout, stderr) = run(tool, args, None)?;
    if !ok {
        return Err(CaptureError::ToolFailed {
            tool,
            detail: stderr.trim().to_string(),
        });
    }
    Ok(stdout)
}

/// Feeds `script` to `tool args` on standard input; a failure names the rule of the first line
/// the tool's errors mention.
pub fn apply(tool: &'static str, args: &[&str], script: &Script) -> Result<(), CaptureError> {
    let (ok, _, stderr) = run(tool, args, Some(script.text()))?;
    if ok {
        return Ok(());
    }
    let rule = failed_line(&stderr)
        .and_then(|line| script.label_of_line(line))
        .unwrap_or("the rule set");
    Err(CaptureError::RuleFailed {
        tool,
        rule: rule.to_string(),
        detail: stderr.trim().to_string(),
    })
}

/// Runs a tool to completion within [`DEADLINE`]: (exited 0, stdout, stderr).
fn run(
    tool: &'static str,
    args: &[&str],
    input: Option<String>,
) -> Result<(bool, String, String), CaptureError> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CaptureError::ToolMissing { tool, source })?;
    // Writing and reading on their own threads: a tool that fills one pipe while we block on
    // another would otherwise never finish.
    let writer = child.stdin.take().zip(input).map(|(mut stdin, text)| {
        thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        })
    });
    let stdout = child.stdout.take().map(reader);
    let stderr = child.stderr.take().map(reader);
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() >= DEADLINE => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CaptureError::Timeout {
                    tool,
                    seconds: DEADLINE.as_secs(),
                });
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                return Err(CaptureError::ToolFailed {
                    tool,
                    detail: e.to_string(),
                })
            }
        }
    };
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    let collect = |handle: Option<thread::JoinHandle<String>>| {
        handle.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    let (stdout, mut stderr) = (collect(stdout), collect(stderr));
    if !status.success() && stderr.trim().is_empty() {
        stderr = status.to_string();
    }
    Ok((status.success(), stdout, stderr))
}

fn reader(pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.take(MAX_OUTPUT).read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The first input line a tool's error output blames: nft says `/dev/stdin:3:20-20: Error`,
/// iptables-restore `Error occurred at line: 3` or `line 4: CHAIN_DEL failed`.
fn failed_line(stderr: &str) -> Option<usize> {
    let leading_number = |text: &str| -> Option<usize> {
        let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    stderr.lines().find_map(|line| {
        if let Some((_, rest)) = line.split_once("/dev/stdin:") {
            return leading_number(rest);
        }
        let (_, rest) = line.split_once("line")?;
        leading_number(rest.trim_start_matches(':').trim_start())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_line_a_tool_blames() {
        assert_eq!(
            failed_line("/dev/stdin:3:20-20: Error: syntax error\n  tcp dport 1 retrn"),
            Some(3)
        );
        assert_eq!(
            failed_line("iptables-restore v1.8.9 (nf_tables): invalid port\nError occurred at line: 5\nTry `iptables-restore -h'"),
            Some(5)
        );
        assert_eq!(
            failed_line("ip6tables-restore v1.8.9 (nf_tables): \nline 2: CHAIN_USER_ADD failed (File exists): chain OUTRIDER_OUTPUT"),
            Some(2)
        );
        assert_eq!(failed_line("Operation not permitted"), None);
    }

    #[test]
    fn a_missing_tool_is_reported_as_missing() {
        let err = output("outrider-no-such-tool", &[]).unwrap_err();
        assert!(matches!(err, CaptureError::ToolMissing { .. }), "{err}");
        assert_eq!(err.exit_code(), 69);
    }
}
