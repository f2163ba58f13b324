//! Policy documents built to hurt a YAML parser, for the tests that prove they cannot.

/// A billion-laughs document (10^9 leaves from 1 KB) whose bomb sits in a real field:
/// `workload` takes a name or a list, so a parser must look inside the value.
pub fn alias_bomb() -> String {
    let mut bomb = String::from("services: {}\nworkload: [&a0 [x, x, x, x, x, x, x, x, x, x]");
    for i in 1..=9 {
        let uses = vec![format!("*a{}", i - 1); 10].join(", ");
        bomb.push_str(&format!(", &a{i} [{uses}]"));
    }
    bomb.push_str("]\n");
    bomb
}

/// 100,000 levels of nesting in 200 KB, in the same field.
pub fn deep_nesting() -> String {
    let levels = 100_000;
    format!("workload: {}x{}\n", "[".repeat(levels), "]".repeat(levels))
}

/// A one-line document refused at once: the reference a hostile one is timed against, so
/// that process start-up on a busy machine is not counted as parsing.
pub const REFUSED_AT_ONCE: &str = "services: []\n";

/// Runs `run` three times and returns the last output with the shortest wall time: the
/// fastest run is the one least disturbed by other processes on the machine.
pub fn fastest_of_three(
    mut run: impl FnMut() -> std::process::Output,
) -> (std::process::Output, std::time::Duration) {
    let mut fastest = std::time::Duration::MAX;
    let mut output = None;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        output = Some(run());
        fastest = fastest.min(started.elapsed());
    }
    (output.expect("ran three times"), fastest)
}
