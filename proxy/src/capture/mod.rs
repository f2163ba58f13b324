//! `outrider-proxy init`: installs the netfilter rules that send a pod's TCP through the proxy
//! (transparent capture), as an init container with NET_ADMIN and NET_RAW would in the pod's
//! network namespace. Outbound TCP goes to the outbound port, except the proxy's own (by UID)
//! and loopback traffic; inbound TCP goes to the inbound port, except the admin port; skip
//! lists exempt more. Both IPv4 and IPv6.
//!
//! Two backends: native nftables (`table inet outrider`, sent to the kernel over netlink as
//! one nf_tables transaction, no tool needed: the image has none) and iptables (chains
//! OUTRIDER_INBOUND/OUTRIDER_OUTPUT in the nat tables, one `iptables-restore --noflush` per
//! family, the first rolled back if the second fails; needs the iptables tools). Either way a
//! failing rule leaves nothing half-installed, and reapplying changes nothing.
//!
//! Self-contained: depends on std, clap, thiserror and socket2 only.

pub mod iptables;
pub mod netlink;
pub mod nft;
pub mod rules;
mod tool;

use std::io::Write;

use rules::{CaptureRules, Cidr, PortRange};

/// Default inbound port (the proxy's `--inbound` default, 0.0.0.0:15006).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Default outbound port (the proxy's `--outbound` default, 127.0.0.1:15001).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default admin port (the proxy's `--admin` default, 127.0.0.1:15000).
pub const DEFAULT_ADMIN_PORT: u16 = 15000;
/// Default UID the proxy runs as (the image's nonroot user).
pub const DEFAULT_PROXY_UID: u32 = 65532;

/// Flags of `outrider-proxy init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Port inbound TCP is redirected to (the proxy's --inbound port).
    #[arg(long, env = "OUTRIDER_INBOUND_PORT", default_value_t = DEFAULT_INBOUND_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// Port outbound TCP is redirected to (the proxy's --outbound port).
    #[arg(long, env = "OUTRIDER_OUTBOUND_PORT", default_value_t = DEFAULT_OUTBOUND_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// The proxy's admin port: inbound connections to it are not redirected.
    #[arg(long, env = "OUTRIDER_ADMIN_PORT", default_value_t = DEFAULT_ADMIN_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub admin_port: u16,
    /// UID the proxy runs as: its own outbound connections are not redirected.
    #[arg(long, env = "OUTRIDER_PROXY_UID", default_value_t = DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,
    /// Inbound ports (or ranges, 9000-9100), comma-separated, that reach the app directly.
    #[arg(long, env = "OUTRIDER_SKIP_INBOUND_PORTS", value_delimiter = ',')]
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound destination ports (or ranges), comma-separated, that are not redirected.
    #[arg(long, env = "OUTRIDER_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound destination networks (IPv4 or IPv6 CIDRs), comma-separated, not redirected.
    #[arg(long, env = "OUTRIDER_SKIP_OUTBOUND_CIDRS", value_delimiter = ',')]
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// Backend: nft (native nftables, programmed over netlink: no tool needed; `auto` is the
    /// same), or iptables (needs iptables-restore and ip6tables-restore, which the Outrider
    /// image does not ship).
    #[arg(long, env = "OUTRIDER_CAPTURE_MODE", value_enum, default_value_t = Mode::Nft)]
    pub mode: Mode,
    /// Print the rules that would be applied, change nothing.
    #[arg(long, env = "OUTRIDER_CAPTURE_DRY_RUN")]
    pub dry_run: bool,
    /// Remove the rules (our table or chains and the jumps to them) instead of installing them.
    #[arg(long, env = "OUTRIDER_CAPTURE_CLEANUP")]
    pub cleanup: bool,
}

/// Which tools apply the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Native nftables: `table inet outrider`, sent over netlink (`auto`, the former default
    /// that picked nft where it worked, is an alias: there is no tool left to look for).
    #[value(alias = "auto")]
    Nft,
    /// iptables and ip6tables (whichever backend they use): chains in the nat tables.
    Iptables,
}

/// Why `init` failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A flag's value is unusable; nothing was applied.
    #[error("{flag}: {reason}")]
    InvalidFlag {
        /// The flag, e.g. `--admin-port`.
        flag: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A tool could not be started (not installed, not on PATH).
    #[error(
        "cannot run {tool}: {source} (the Outrider image ships no iptables tools: use --mode nft, \
         or run --mode iptables from an image that has them, or let a CNI plugin install the rules)"
    )]
    ToolMissing {
        /// The program.
        tool: &'static str,
        /// Why it did not start.
        source: std::io::Error,
    },
    /// The kernel or tool refused the rules; that transaction applied nothing.
    #[error("{tool} refused rule \"{rule}\": {detail}")]
    RuleFailed {
        /// The program.
        tool: &'static str,
        /// The name of the first rule it reported (or "the rule set" when it named none).
        rule: String,
        /// Its error output.
        detail: String,
    },
    /// A tool failed without naming a line (e.g. `iptables-save`).
    #[error("{tool} failed: {detail}")]
    ToolFailed {
        /// The program.
        tool: &'static str,
        /// Its error output or exit status.
        detail: String,
    },
    /// The kernel cannot take nftables rules (no nf_tables, or no netfilter netlink socket).
    #[error(
        "nftables is not available: {detail} (--mode nft needs a kernel with nf_tables; \
         --mode iptables needs an image with the iptables tools)"
    )]
    NfTablesUnavailable {
        /// What failed.
        detail: String,
    },
    /// A tool (or the kernel) did not finish in time; a tool is killed.
    #[error("{tool} did not finish within {seconds} s")]
    Timeout {
        /// The program.
        tool: &'static str,
        /// The deadline.
        seconds: u64,
    },
    /// The second family failed and undoing the first failed too: the IPv4 rules may remain.
    #[error("{failure}; undoing the IPv4 rules failed too: {rollback}")]
    RollbackFailed {
        /// The failure that started the rollback.
        failure: Box<CaptureError>,
        /// Why the rollback failed.
        rollback: Box<CaptureError>,
    },
}

impl CaptureError {
    pub(crate) fn invalid(flag: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidFlag {
            flag,
            reason: reason.into(),
        }
    }

    /// The process exit code for this error (sysexits): 64 for a bad flag, 69 when a tool or
    /// nf_tables is missing, 71 when the rules could not be applied.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::InvalidFlag { .. } => 64,
            Self::ToolMissing { .. } | Self::NfTablesUnavailable { .. } => 69,
            _ => 71,
        }
    }
}

/// Lines of a script for a tool, each remembering the rule it belongs to, so a tool's error
/// about line N names that rule.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Script {
    lines: Vec<(String, &'static str)>,
}

impl Script {
    /// Appends a line that belongs to rule `label`.
    pub fn line(&mut self, text: impl Into<String>, label: &'static str) {
        self.lines.push((text.into(), label));
    }

    /// The script's text, newline-terminated.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for (line, _) in &self.lines {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// The rule line `number` (1-based) belongs to.
    pub fn label_of_line(&self, number: usize) -> Option<&'static str> {
        let index = number.checked_sub(1)?;
        self.lines.get(index).map(|(_, label)| *label)
    }
}

impl InitArgs {
    /// The validated rules these flags describe.
    pub fn rules(&self) -> Result<CaptureRules, CaptureError> {
        let rules = CaptureRules {
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            admin_port: self.admin_port,
            proxy_uid: self.proxy_uid,
            skip_inbound_ports: self.skip_inbound_ports.clone(),
            skip_outbound_ports: self.skip_outbound_ports.clone(),
            skip_outbound_cidrs: self.skip_outbound_cidrs.clone(),
        };
        rules.validate()?;
        Ok(rules)
    }
}

/// Runs `init`: validates, picks the backend, then prints (`--dry-run`), installs or removes
/// the rules. What it did is written to `out`.
pub fn run(args: &InitArgs, out: &mut dyn Write) -> Result<(), CaptureError> {
    let rules = args.rules()?;
    match args.mode {
        Mode::Nft => run_nft(args, &rules, out),
        Mode::Iptables => run_iptables(args, &rules, out),
    }
}

fn run_nft(args: &InitArgs, rules: &CaptureRules, out: &mut dyn Write) -> Result<(), CaptureError> {
    let script = if args.cleanup {
        nft::render_cleanup()
    } else {
        nft::render(rules)
    };
    if args.dry_run {
        let _ = write!(out, "# nft -f -\n{}", script.text());
        return Ok(());
    }
    let batch = if args.cleanup {
        netlink::Batch::cleanup()
    } else {
        netlink::Batch::install(&nft::table(rules))
    };
    netlink::apply(&batch)?;
    let done = if args.cleanup { "removed" } else { "installed" };
    let _ = writeln!(
        out,
        "outrider-proxy init: table {} {done} (nftables over netlink)",
        nft::TABLE
    );
    Ok(())
}

fn run_iptables(
    args: &InitArgs,
    rules: &CaptureRules,
    out: &mut dyn Write,
) -> Result<(), CaptureError> {
    use iptables::Family;
    // Render both families before applying either: a problem found late must not leave the
    // first family installed.
    let mut plans = Vec::new();
    for family in [Family::V4, Family::V6] {
        let saved = match tool::output(family.save_tool(), &["-t", "nat"]) {
            Ok(saved) => saved,
            // A dry run shows the rules even where the tables cannot be read (no capability,
            // no tools): as for a table holding nothing of ours.
            Err(e) if args.dry_run => {
                let _ = writeln!(
                    out,
                    "# cannot read the nat table ({e}): assuming it is empty"
                );
                String::new()
            }
            Err(e) => return Err(e),
        };
        let existing = iptables::parse_save(&saved);
        let script = if args.cleanup {
            iptables::render_cleanup(&existing)
        } else {
            Some(iptables::render(rules, family, &existing))
        };
        plans.push((family, saved, script));
    }
    if args.dry_run {
        for (family, _, script) in &plans {
            let text = script.as_ref().map_or_else(
                || "# (nothing of ours to remove)\n".to_string(),
                Script::text,
            );
            let _ = write!(out, "# {} --noflush\n{text}", family.restore_tool());
        }
        return Ok(());
    }
    let mut applied: Vec<(Family, &str)> = Vec::new();
    for (family, saved, script) in &plans {
        let Some(script) = script else { continue };
        if let Err(failure) = tool::apply(family.restore_tool(), &["--noflush"], script) {
            return Err(match rollback(&applied) {
                Ok(()) => failure,
                Err(rollback) => CaptureError::RollbackFailed {
                    failure: Box::new(failure),
                    rollback: Box::new(rollback),
                },
            });
        }
        applied.push((*family, saved));
    }
    let done = if args.cleanup { "removed" } else { "installed" };
    let _ = writeln!(
        out,
        "outrider-proxy init: chains {} and {} {done} (iptables, ip6tables)",
        iptables::INBOUND_CHAIN,
        iptables::OUTBOUND_CHAIN
    );
    Ok(())
}

/// Puts the nat tables of the families already changed back as they were: where nothing of
/// ours was there, removes ours (leaving the rest of the table untouched); where a previous
/// installation was, restores the saved nat table.
fn rollback(applied: &[(iptables::Family, &str)]) -> Result<(), CaptureError> {
    for (family, saved) in applied {
        if iptables::parse_save(saved).is_empty() {
            let now = tool::output(family.save_tool(), &["-t", "nat"])?;
            if let Some(script) = iptables::render_cleanup(&iptables::parse_save(&now)) {
                tool::apply(family.restore_tool(), &["--noflush"], &script)?;
            }
        } else {
            // Without --noflush, restoring the saved nat table replaces just that table.
            let mut script = Script::default();
            for line in saved.lines() {
                script.line(line, "restore the saved nat table");
            }
            tool::apply(family.restore_tool(), &[], &script)?;
        }
    }
    Ok(())
}
