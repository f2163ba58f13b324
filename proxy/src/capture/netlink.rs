//! The nft mode without the nft tool: our table ([`super::nft::table`]) encoded as nf_tables
//! netlink messages and sent to the kernel over a `NETLINK_NETFILTER` socket as one nfnetlink
//! batch (`BATCH_BEGIN`, the table, chain and rule messages, `BATCH_END`). The kernel applies a
//! batch as one transaction, so the rules are installed whole or not at all, as with `nft -f`.
//! Every message asks for an acknowledgement; the first error names its rule.
//!
//! Written here rather than taken from a crate: the Rust nftables crates are GPL (rustables)
//! or young, and deny.toml admits permissive licences only. The encoding follows what
//! `nft --debug=netlink,mnl -f` sends (nftables 1.0.6), attribute numbers from the kernel's
//! uapi `linux/netfilter/nf_tables.h`; the unit tests hold the byte layouts nft produced.

use std::io::{self, Read};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::nft::{Action, Chain, Hook, Match, Rule, TABLE_NAME};
use super::CaptureError;

/// How errors name us.
const TOOL: &str = "nf_tables";
/// Longest the kernel may take to acknowledge the whole batch (it takes milliseconds; this
/// bounds a kernel stuck loading a module).
const ACK_DEADLINE: Duration = Duration::from_secs(10);
/// Longest a send may block.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer asked for: room for an acknowledgement per message of the largest batch
/// (about 200 messages); the kernel caps it at `net.core.rmem_max`.
const RECV_BUFFER: usize = 1 << 20;
/// Largest datagram read: an error acknowledgement carries the whole refused message back.
const MAX_DATAGRAM: usize = 64 << 10;

// linux/socket.h, linux/netlink.h
const AF_NETLINK: i32 = 16;
const NETLINK_NETFILTER: i32 = 12;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const EOPNOTSUPP: i32 = 95;

// linux/netfilter/nfnetlink.h, linux/netfilter.h
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NF_ACCEPT: u32 = 1;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;
const IPPROTO_TCP: u8 = 6;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

// linux/netfilter/nf_tables.h
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_RETURN: i32 = -5;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_SKUID: u32 = 10;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;
/// libnftnl's user data type for a rule's comment (`NFTNL_UDATA_RULE_COMMENT`).
const UDATA_RULE_COMMENT: u8 = 0;
/// The interface name length the kernel compares (`IFNAMSIZ`).
const IFNAMSIZ: usize = 16;

/// One netlink message being written: attributes are appended in order, a nest's length is
/// filled in when it closes, and the message's length when it is finished.
struct Message {
    bytes: Vec<u8>,
}

impl Message {
    /// A message with its netlink header and the nfnetlink header (`struct nfgenmsg`).
    fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Self {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        bytes.push(family);
        bytes.push(0); // NFNETLINK_V0
        bytes.extend_from_slice(&res_id.to_be_bytes());
        Self { bytes }
    }

    /// An nf_tables message (`NFT_MSG_*`) about the `inet` family.
    fn nftables(msg: u16, flags: u16, seq: u32) -> Self {
        Self::new(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            NFPROTO_INET,
            0,
        )
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        // Payloads here are at most a few hundred bytes (names, a comment, 16-byte values).
        let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.bytes.extend_from_slice(&len.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(payload);
        self.pad();
    }

    /// A NUL-terminated string.
    fn string(&mut self, kind: u16, text: &str) {
        let mut payload = Vec::with_capacity(text.len() + 1);
        payload.extend_from_slice(text.as_bytes());
        payload.push(0);
        self.attr(kind, &payload);
    }

    /// A 32-bit number, in network byte order as nf_tables expects.
    fn be32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_be_bytes());
    }

    fn nest(&mut self, kind: u16, body: impl FnOnce(&mut Self)) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        body(self);
        let len = u16::try_from(self.bytes.len() - start).unwrap_or(u16::MAX);
        self.bytes[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.bytes[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.bytes.len()).unwrap_or(u32::MAX);
        self.bytes[..4].copy_from_slice(&len.to_ne_bytes());
        self.bytes
    }

    /// One expression of a rule: its name and its attributes.
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Self)) {
        self.nest(NFTA_LIST_ELEM, |m| {
            m.string(NFTA_EXPR_NAME, name);
            m.nest(NFTA_EXPR_DATA, body);
        });
    }

    /// `meta load KEY => reg 1`
    fn meta(&mut self, key: u32) {
        self.expr("meta", |m| {
            m.be32(NFTA_META_KEY, key);
            m.be32(NFTA_META_DREG, NFT_REG_1);
        });
    }

    /// `cmp OP reg 1 DATA`
    fn cmp(&mut self, op: u32, data: &[u8]) {
        self.expr("cmp", |m| {
            m.be32(NFTA_CMP_SREG, NFT_REG_1);
            m.be32(NFTA_CMP_OP, op);
            m.nest(NFTA_CMP_DATA, |m| m.attr(NFTA_DATA_VALUE, data));
        });
    }

    /// `payload load LEN b @ BASE header + OFFSET => reg 1`
    fn payload(&mut self, base: u32, offset: u32, len: u32) {
        self.expr("payload", |m| {
            m.be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
            m.be32(NFTA_PAYLOAD_BASE, base);
            m.be32(NFTA_PAYLOAD_OFFSET, offset);
            m.be32(NFTA_PAYLOAD_LEN, len);
        });
    }

    /// `bitwise reg 1 = (reg 1 & MASK) ^ 0`
    fn mask(&mut self, mask: &[u8]) {
        let len = u32::try_from(mask.len()).unwrap_or(u32::MAX);
        let zeros = vec![0; mask.len()];
        self.expr("bitwise", |m| {
            m.be32(NFTA_BITWISE_SREG, NFT_REG_1);
            m.be32(NFTA_BITWISE_DREG, NFT_REG_1);
            m.be32(NFTA_BITWISE_LEN, len);
            m.nest(NFTA_BITWISE_MASK, |m| m.attr(NFTA_DATA_VALUE, mask));
            m.nest(NFTA_BITWISE_XOR, |m| m.attr(NFTA_DATA_VALUE, &zeros));
        });
    }

    /// `meta load KEY => reg 1; cmp eq reg 1 VALUE`
    fn meta_eq(&mut self, key: u32, value: &[u8]) {
        self.meta(key);
        self.cmp(NFT_CMP_EQ, value);
    }

    fn matches(&mut self, condition: &Match) {
        match condition {
            Match::Tcp => self.meta_eq(NFT_META_L4PROTO, &[IPPROTO_TCP]),
            Match::TcpDport(ports) => {
                self.meta_eq(NFT_META_L4PROTO, &[IPPROTO_TCP]);
                self.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
                if ports.first == ports.last {
                    self.cmp(NFT_CMP_EQ, &ports.first.to_be_bytes());
                } else {
                    self.cmp(NFT_CMP_GTE, &ports.first.to_be_bytes());
                    self.cmp(NFT_CMP_LTE, &ports.last.to_be_bytes());
                }
            }
            // The kernel compares the UID in host byte order.
            Match::SkUid(uid) => self.meta_eq(NFT_META_SKUID, &uid.to_ne_bytes()),
            Match::OifName(name) => {
                let mut padded = [0u8; IFNAMSIZ];
                let len = name.len().min(IFNAMSIZ - 1);
                padded[..len].copy_from_slice(&name.as_bytes()[..len]);
                self.meta_eq(NFT_META_OIFNAME, &padded);
            }
            Match::Daddr(cidr) => {
                let (family, offset, address) = match cidr.network {
                    IpAddr::V4(v4) => (NFPROTO_IPV4, 16, v4.octets().to_vec()),
                    IpAddr::V6(v6) => (NFPROTO_IPV6, 24, v6.octets().to_vec()),
                };
                self.meta_eq(NFT_META_NFPROTO, &[family]);
                let prefix = usize::from(cidr.prefix);
                if prefix.is_multiple_of(8) && prefix > 0 {
                    // Whole bytes: compare just those, as nft does.
                    let len = prefix / 8;
                    self.payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len as u32);
                    self.cmp(NFT_CMP_EQ, &address[..len]);
                } else {
                    let len = address.len();
                    self.payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len as u32);
                    self.mask(&prefix_mask(prefix, len));
                    self.cmp(NFT_CMP_EQ, &address);
                }
            }
        }
    }

    fn action(&mut self, action: Action) {
        match action {
            Action::Return => self.expr("immediate", |m| {
                m.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                m.nest(NFTA_IMMEDIATE_DATA, |m| {
                    m.nest(NFTA_DATA_VERDICT, |m| {
                        m.attr(NFTA_VERDICT_CODE, &NFT_RETURN.to_be_bytes());
                    });
                });
            }),
            Action::RedirectTo(port) => {
                self.expr("immediate", |m| {
                    m.be32(NFTA_IMMEDIATE_DREG, NFT_REG_1);
                    m.nest(NFTA_IMMEDIATE_DATA, |m| {
                        m.attr(NFTA_DATA_VALUE, &port.to_be_bytes());
                    });
                });
                self.expr("redir", |m| {
                    m.be32(NFTA_REDIR_REG_PROTO_MIN, NFT_REG_1);
                    m.be32(NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
                });
            }
        }
    }
}

/// `len` bytes with the first `prefix` bits set.
fn prefix_mask(prefix: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let bits = prefix.saturating_sub(i * 8).min(8);
            // bits <= 8, so the shift cannot overflow a u16.
            (0xff00u16 >> bits) as u8
        })
        .collect()
}

/// `NFT_MSG_NEWTABLE`: `table inet outrider` (no flags).
pub fn new_table(seq: u32) -> Vec<u8> {
    let mut m = Message::nftables(NFT_MSG_NEWTABLE, NLM_F_CREATE, seq);
    m.string(NFTA_TABLE_NAME, TABLE_NAME);
    m.be32(NFTA_TABLE_FLAGS, 0);
    m.finish()
}

/// `NFT_MSG_DELTABLE`: `delete table inet outrider`.
pub fn delete_table(seq: u32) -> Vec<u8> {
    let mut m = Message::nftables(NFT_MSG_DELTABLE, 0, seq);
    m.string(NFTA_TABLE_NAME, TABLE_NAME);
    m.finish()
}

/// `NFT_MSG_NEWCHAIN`: a nat base chain with policy accept.
pub fn new_chain(seq: u32, chain: &Chain) -> Vec<u8> {
    let mut m = Message::nftables(NFT_MSG_NEWCHAIN, NLM_F_CREATE, seq);
    m.string(NFTA_CHAIN_TABLE, TABLE_NAME);
    m.string(NFTA_CHAIN_NAME, chain.name);
    m.string(NFTA_CHAIN_TYPE, "nat");
    m.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
    let hook = match chain.hook {
        Hook::Prerouting => NF_INET_PRE_ROUTING,
        Hook::Output => NF_INET_LOCAL_OUT,
    };
    m.nest(NFTA_CHAIN_HOOK, |m| {
        m.be32(NFTA_HOOK_HOOKNUM, hook);
        // The kernel reads the priority as a signed 32-bit number.
        m.attr(NFTA_HOOK_PRIORITY, &chain.priority.to_be_bytes());
    });
    m.finish()
}

/// `NFT_MSG_NEWRULE`: `rule` appended to `chain`, its label as its comment.
pub fn new_rule(seq: u32, chain: &str, rule: &Rule) -> Vec<u8> {
    let mut m = Message::nftables(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, seq);
    m.string(NFTA_RULE_TABLE, TABLE_NAME);
    m.string(NFTA_RULE_CHAIN, chain);
    m.nest(NFTA_RULE_EXPRESSIONS, |m| {
        for condition in &rule.matches {
            m.matches(condition);
        }
        m.action(rule.action);
    });
    // libnftnl's TLV: type, length (with the NUL), the comment.
    let mut comment = vec![
        UDATA_RULE_COMMENT,
        u8::try_from(rule.label.len() + 1).unwrap_or(u8::MAX),
    ];
    comment.extend_from_slice(rule.label.as_bytes());
    comment.push(0);
    m.attr(NFTA_RULE_USERDATA, &comment);
    m.finish()
}

/// A whole transaction for the kernel: one datagram, and which rule each message is.
#[derive(Debug, Clone)]
pub struct Batch {
    bytes: Vec<u8>,
    begin_seq: u32,
    /// Sequence number and name of each message between BEGIN and END.
    messages: Vec<(u32, String)>,
}

impl Batch {
    fn begin() -> Self {
        let begin_seq = 1;
        let header = Message::new(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            begin_seq,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        Self {
            bytes: header.finish(),
            begin_seq,
            messages: Vec::new(),
        }
    }

    fn next_seq(&self) -> u32 {
        let count = u32::try_from(self.messages.len()).unwrap_or(u32::MAX - 2);
        self.begin_seq.saturating_add(count).saturating_add(1)
    }

    fn push(&mut self, name: impl Into<String>, encode: impl FnOnce(u32) -> Vec<u8>) {
        let seq = self.next_seq();
        self.bytes.extend_from_slice(&encode(seq));
        self.messages.push((seq, name.into()));
    }

    fn end(mut self) -> Self {
        let end = Message::new(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            self.next_seq(),
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        self.bytes.extend_from_slice(&end.finish());
        self
    }

    /// Replaces our table with `chains`: create it (so the delete is valid when it was
    /// absent), delete it, create it again with its chains and rules.
    pub fn install(chains: &[Chain]) -> Self {
        let mut batch = Self::cleanup_messages();
        batch.push("table inet outrider", new_table);
        for chain in chains {
            batch.push(chain.label, |seq| new_chain(seq, chain));
            for rule in &chain.rules {
                batch.push(format!("{}: {rule}", rule.label), |seq| {
                    new_rule(seq, chain.name, rule)
                });
            }
        }
        batch.end()
    }

    /// Removes our table, and nothing when it is absent.
    pub fn cleanup() -> Self {
        Self::cleanup_messages().end()
    }

    fn cleanup_messages() -> Self {
        let mut batch = Self::begin();
        batch.push("table inet outrider", new_table);
        batch.push("table inet outrider", delete_table);
        batch
    }

    /// The datagram sent to the kernel.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn name_of(&self, seq: u32) -> Option<&str> {
        self.messages
            .iter()
            .find(|(s, _)| *s == seq)
            .map(|(_, name)| name.as_str())
    }
}

/// Sends `batch` to the kernel of this network namespace and waits (at most
/// `ACK_DEADLINE`, 10 s) for every message's acknowledgement. On a refusal the kernel has applied
/// none of the batch; the error names the first refused message.
pub fn apply(batch: &Batch) -> Result<(), CaptureError> {
    let unavailable = |detail: String| CaptureError::NfTablesUnavailable { detail };
    let failed = |what: &str, e: io::Error| CaptureError::ToolFailed {
        tool: TOOL,
        detail: format!("{what}: {e}"),
    };
    let socket = Socket::new(
        Domain::from(AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(NETLINK_NETFILTER)),
    )
    .map_err(|e| unavailable(format!("cannot open a netfilter netlink socket: {e}")))?;
    socket
        .set_write_timeout(Some(SEND_TIMEOUT))
        .map_err(|e| failed("socket", e))?;
    // Best effort: the default buffer also holds the acknowledgements of a batch this size.
    let _ = socket.set_recv_buffer_size(RECV_BUFFER);
    // Unconnected and unbound, a netlink socket sends to the kernel (port 0).
    let sent = socket.send(batch.bytes()).map_err(|e| failed("send", e))?;
    if sent != batch.bytes().len() {
        return Err(CaptureError::ToolFailed {
            tool: TOOL,
            detail: format!("sent {sent} of {} bytes", batch.bytes().len()),
        });
    }

    let deadline = Instant::now() + ACK_DEADLINE;
    let mut acknowledged = vec![false; batch.messages.len()];
    let mut refused: Option<(u32, i32)> = None;
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    while acknowledged.contains(&false) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(CaptureError::Timeout {
                tool: TOOL,
                seconds: ACK_DEADLINE.as_secs(),
            });
        }
        socket
            .set_read_timeout(Some(remaining))
            .map_err(|e| failed("socket", e))?;
        let len = match (&socket).read(&mut buffer) {
            Ok(len) => len,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(CaptureError::Timeout {
                    tool: TOOL,
                    seconds: ACK_DEADLINE.as_secs(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed("receive", e)),
        };
        for ack in acks(&buffer[..len])
            .map_err(|detail| CaptureError::ToolFailed { tool: TOOL, detail })?
        {
            if ack.seq == batch.begin_seq && ack.errno != 0 {
                // The batch as a whole: nf_tables missing, or the commit itself refused.
                return Err(if ack.errno == EOPNOTSUPP {
                    unavailable("the kernel has no nf_tables".to_string())
                } else {
                    CaptureError::RuleFailed {
                        tool: TOOL,
                        rule: "the rule set".to_string(),
                        detail: io::Error::from_raw_os_error(ack.errno).to_string(),
                    }
                });
            }
            let Some(index) = batch.messages.iter().position(|(s, _)| *s == ack.seq) else {
                continue;
            };
            acknowledged[index] = true;
            if ack.errno != 0 && refused.is_none_or(|(seq, _)| ack.seq < seq) {
                refused = Some((ack.seq, ack.errno));
            }
        }
    }
    match refused {
        None => Ok(()),
        Some((seq, errno)) => Err(CaptureError::RuleFailed {
            tool: TOOL,
            rule: batch.name_of(seq).unwrap_or("the rule set").to_string(),
            detail: io::Error::from_raw_os_error(errno).to_string(),
        }),
    }
}

/// An acknowledgement: the sequence number it answers and the errno (0: applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ack {
    seq: u32,
    errno: i32,
}

/// The acknowledgements (`NLMSG_ERROR` messages) in one datagram; other messages are skipped.
fn acks(mut datagram: &[u8]) -> Result<Vec<Ack>, String> {
    let mut found = Vec::new();
    while datagram.len() >= NLMSG_HDRLEN {
        let u32_at = |at: usize| -> u32 {
            let mut word = [0u8; 4];
            word.copy_from_slice(&datagram[at..at + 4]);
            u32::from_ne_bytes(word)
        };
        let len = u32_at(0) as usize;
        if len < NLMSG_HDRLEN || len > datagram.len() {
            return Err(format!("malformed netlink message (length {len})"));
        }
        let kind = u16::from_ne_bytes([datagram[4], datagram[5]]);
        if kind == NLMSG_ERROR {
            if len < NLMSG_HDRLEN + 4 {
                return Err("truncated netlink acknowledgement".to_string());
            }
            // struct nlmsgerr: a negative errno, then the request's header.
            let error = u32_at(NLMSG_HDRLEN) as i32;
            found.push(Ack {
                seq: u32_at(8),
                errno: error.checked_neg().unwrap_or(i32::MAX),
            });
        }
        let next = len.div_ceil(4).saturating_mul(4).min(datagram.len());
        datagram = &datagram[next..];
    }
    Ok(found)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::capture::nft;
    use crate::capture::rules::{CaptureRules, Cidr, PortRange};

    // What nft 1.0.6 sent for the same rules (`nft --debug=mnl -f`, see the module docs): each
    // message after its 16-byte netlink header, i.e. the nfgenmsg and the attributes.
    const NFT_NEWTABLE: &str = "010000000d0001006f75747269646572000000000800020000000000";
    const NFT_DELTABLE: &str = "010000000d0001006f7574726964657200000000";
    const NFT_CHAIN_INBOUND: &str = "010000000d0001006f75747269646572000000000c000300696e626f756e6400080007006e617400080005000000000114000480080001000000000008000200ffffff9c";
    const NFT_CHAIN_OUTPUT: &str = "010000000d0001006f75747269646572000000000b0003006f75747075740000080007006e617400080005000000000114000480080001000000000308000200ffffff9c";
    /// `tcp dport 15000 return comment "admin port"`
    const NFT_ADMIN_PORT: &str = "010000000d0001006f75747269646572000000000c000200696e626f756e6400e400048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000208000400000000022c00018008000100636d700020000280080001000000000108000200000000000c000380060001003a980000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb11000700000b61646d696e20706f727400000000";
    /// `tcp dport 9000-9100 return comment "skip inbound ports"`
    const NFT_PORT_RANGE: &str = "010000000d0001006f75747269646572000000000c000200696e626f756e64001001048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000208000400000000022c00018008000100636d700020000280080001000000000108000200000000050c00038006000100232800002c00018008000100636d700020000280080001000000000108000200000000030c00038006000100238c0000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb190007000013736b697020696e626f756e6420706f72747300000000";
    /// `meta l4proto tcp redirect to :15006 comment "inbound to proxy"`
    const NFT_REDIRECT: &str = "010000000d0001006f75747269646572000000000c000200696e626f756e6400a400048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c00038005000100060000002c0001800e000100696d6d6564696174650000001800028008000100000000010c000280060001003a9e0000240001800a00010072656469720000001400028008000100000000010800030000000002170007000011696e626f756e6420746f2070726f78790000";
    /// `meta skuid 65532 return comment "proxy uid"`
    const NFT_SKUID: &str = "010000000d0001006f75747269646572000000000b0002006f757470757400008400048024000180090001006d6574610000000014000280080002000000000a08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c00038008000100fcff0000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb10000700000a70726f78792075696400";
    /// `oifname "lo" return comment "loopback"`
    const NFT_OIFNAME: &str = "010000000d0001006f75747269646572000000000b0002006f757470757400009000048024000180090001006d6574610000000014000280080002000000000708000100000000013800018008000100636d70002c0002800800010000000001080002000000000018000380140001006c6f0000000000000000000000000000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb0f00070000096c6f6f706261636b0000";
    /// `ip daddr 192.0.2.0/24 return comment "skip outbound cidrs ipv4"`
    const NFT_CIDR_V4: &str = "010000000d0001006f75747269646572000000000b0002006f75747075740000e400048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000032c00018008000100636d700020000280080001000000000108000200000000000c00038007000100c0000200300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb1f0007000019736b6970206f7574626f756e6420636964727320697076340000";
    /// `ip daddr 198.51.100.7 return comment "skip outbound cidrs ipv4"`
    const NFT_ADDRESS_V4: &str = "010000000d0001006f75747269646572000000000b0002006f75747075740000e400048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000042c00018008000100636d700020000280080001000000000108000200000000000c00038008000100c6336407300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb1f0007000019736b6970206f7574626f756e6420636964727320697076340000";
    /// `ip6 daddr 2001:db8:1::/48 return comment "skip outbound cidrs ipv6"`
    const NFT_CIDR_V6: &str = "010000000d0001006f75747269646572000000000b0002006f75747075740000e800048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001808000400000000063000018008000100636d70002400028008000100000000010800020000000000100003800a00010020010db800010000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb1f0007000019736b6970206f7574626f756e6420636964727320697076360000";
    /// `ip daddr 0.0.0.0/0 return comment "zero"`: not whole bytes, so masked (bitwise).
    const NFT_CIDR_MASKED: &str = "010000000d0001006f75747269646572000000000b0002006f757470757400002801048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f616400240002800800010000000001080002000000000108000300000000100800040000000004440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100000000000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000000c0003800800010000000000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb0b00070000057a65726f0000";

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Checks a message's netlink header (its length, type, flags and sequence number; nft
    /// 1.0.6 asks for no acknowledgements, we do) and that the rest is what nft sent.
    fn assert_message(encoded: &[u8], msg: u16, flags: u16, seq: u32, nft: &str) {
        let word = |at: usize| u32::from_ne_bytes(encoded[at..at + 4].try_into().unwrap());
        assert_eq!(word(0) as usize, encoded.len(), "length field");
        assert_eq!(
            u16::from_ne_bytes([encoded[4], encoded[5]]),
            (NFNL_SUBSYS_NFTABLES << 8) | msg
        );
        assert_eq!(u16::from_ne_bytes([encoded[6], encoded[7]]), flags);
        assert_eq!(word(8), seq);
        assert_eq!(word(12), 0, "port id");
        let body = &encoded[NLMSG_HDRLEN..];
        assert!(
            body == hex(nft).as_slice(),
            "differs from nft's message:\n ours {}\n nft  {nft}",
            body.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
    }

    const NEW: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
    const APPEND: u16 = NEW | NLM_F_APPEND;

    fn rules() -> CaptureRules {
        CaptureRules {
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15000,
            proxy_uid: 65532,
            skip_inbound_ports: vec![],
            skip_outbound_ports: vec![],
            skip_outbound_cidrs: vec![],
        }
    }

    fn return_rule(condition: Match, label: &'static str) -> Rule {
        Rule {
            matches: vec![condition],
            action: Action::Return,
            label,
        }
    }

    fn cidr(text: &str) -> Match {
        Match::Daddr(text.parse::<Cidr>().unwrap())
    }

    #[test]
    fn table_and_chains_are_encoded_as_nft_does() {
        assert_message(&new_table(1), NFT_MSG_NEWTABLE, NEW, 1, NFT_NEWTABLE);
        assert_message(
            &delete_table(2),
            NFT_MSG_DELTABLE,
            NLM_F_REQUEST | NLM_F_ACK,
            2,
            NFT_DELTABLE,
        );
        let chains = nft::table(&rules());
        assert_message(
            &new_chain(4, &chains[0]),
            NFT_MSG_NEWCHAIN,
            NEW,
            4,
            NFT_CHAIN_INBOUND,
        );
        assert_message(
            &new_chain(5, &chains[1]),
            NFT_MSG_NEWCHAIN,
            NEW,
            5,
            NFT_CHAIN_OUTPUT,
        );
    }

    #[test]
    fn rules_are_encoded_as_nft_does() {
        let chains = nft::table(&rules());
        let (inbound, output) = (&chains[0].rules, &chains[1].rules);
        let rule = |seq, chain, rule: &Rule, nft| {
            assert_message(
                &new_rule(seq, chain, rule),
                NFT_MSG_NEWRULE,
                APPEND,
                seq,
                nft,
            )
        };
        rule(6, "inbound", &inbound[0], NFT_ADMIN_PORT);
        let range = PortRange {
            first: 9000,
            last: 9100,
        };
        rule(
            7,
            "inbound",
            &return_rule(Match::TcpDport(range), "skip inbound ports"),
            NFT_PORT_RANGE,
        );
        rule(8, "inbound", &inbound[1], NFT_REDIRECT);
        rule(9, "output", &output[0], NFT_SKUID);
        rule(10, "output", &output[1], NFT_OIFNAME);
        let v4 = "skip outbound cidrs ipv4";
        rule(
            11,
            "output",
            &return_rule(cidr("192.0.2.0/24"), v4),
            NFT_CIDR_V4,
        );
        rule(
            12,
            "output",
            &return_rule(cidr("198.51.100.7"), v4),
            NFT_ADDRESS_V4,
        );
        let v6 = "skip outbound cidrs ipv6";
        rule(
            13,
            "output",
            &return_rule(cidr("2001:db8:1::/48"), v6),
            NFT_CIDR_V6,
        );
        rule(
            14,
            "output",
            &return_rule(cidr("0.0.0.0/0"), "zero"),
            NFT_CIDR_MASKED,
        );
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(0, 4), [0, 0, 0, 0]);
        assert_eq!(prefix_mask(12, 4), [0xff, 0xf0, 0, 0]);
        assert_eq!(prefix_mask(32, 4), [0xff; 4]);
        assert_eq!(prefix_mask(33, 16)[..5], [0xff, 0xff, 0xff, 0xff, 0x80]);
    }

    #[test]
    fn a_batch_is_begin_messages_end_with_rising_sequence_numbers() {
        let batch = Batch::install(&nft::table(&rules()));
        let names: Vec<&str> = batch.messages.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "table inet outrider",
                "table inet outrider",
                "table inet outrider",
                "chain inbound",
                "admin port: tcp dport 15000 return",
                "inbound to proxy: meta l4proto tcp redirect to :15006",
                "chain output",
                "proxy uid: meta skuid 65532 return",
                "loopback: oifname \"lo\" return",
                "outbound to proxy: meta l4proto tcp redirect to :15001",
            ]
        );
        let seqs: Vec<u32> = batch.messages.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (2..12).collect::<Vec<u32>>());
        // BATCH_BEGIN and BATCH_END around them, both for the nf_tables subsystem.
        let bytes = batch.bytes();
        assert_eq!(&bytes[4..6], &NFNL_MSG_BATCH_BEGIN.to_ne_bytes());
        assert_eq!(&bytes[16..20], &[0, 0, 0, 10]);
        let end = &bytes[bytes.len() - 20..];
        assert_eq!(&end[..4], &20u32.to_ne_bytes());
        assert_eq!(&end[4..6], &NFNL_MSG_BATCH_END.to_ne_bytes());
        assert_eq!(&end[8..12], &12u32.to_ne_bytes());
        assert_eq!(&end[16..20], &[0, 0, 0, 10]);
        let cleanup: Vec<u32> = Batch::cleanup().messages.iter().map(|(s, _)| *s).collect();
        assert_eq!(cleanup, [2, 3]);
    }

    fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&36u32.to_ne_bytes());
        bytes.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        bytes.extend_from_slice(&0x100u16.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(&(-errno).to_ne_bytes());
        bytes.extend_from_slice(&[0; 16]);
        bytes
    }

    #[test]
    fn acknowledgements_are_read_and_garbage_is_refused() {
        let mut datagram = ack(3, 0);
        datagram.extend(ack(4, 2));
        assert_eq!(
            acks(&datagram).unwrap(),
            [Ack { seq: 3, errno: 0 }, Ack { seq: 4, errno: 2 }]
        );
        let mut short = ack(3, 0);
        short[0] = 200;
        assert!(acks(&short).is_err());
        short[0] = 17;
        assert!(acks(&short[..17]).is_err());
        assert_eq!(acks(&[0; 8]).unwrap(), []);
    }

    /// Runs the calling test again in a network namespace of its own (`unshare --net`), so
    /// it can program netfilter without touching the host's. Returns true in that rerun; in
    /// the first run, asserts the rerun passed (or says why it cannot run: not root, no
    /// `unshare`) and returns false.
    fn in_own_network_namespace(test: &str) -> bool {
        const MARK: &str = "OUTRIDER_TEST_IN_NETNS";
        if std::env::var_os(MARK).is_some() {
            return true;
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0");
        if !root {
            eprintln!("SKIPPED: not root (a network namespace and netfilter need root)");
            return false;
        }
        let output = std::process::Command::new("unshare")
            .arg("--net")
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(MARK, "1")
            .output();
        match output {
            Err(e) => eprintln!("SKIPPED: cannot run unshare: {e}"),
            Ok(output) => {
                let stdout = String::from_utf8_lossy(&output.stdout);
                assert!(
                    output.status.success() && stdout.contains("1 passed"),
                    "{test} in its own network namespace:\n{stdout}\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        false
    }

    /// The kernel's ruleset as nft lists it (the test's own view; `init` needs no nft).
    fn ruleset() -> String {
        let output = std::process::Command::new("nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn kernel_refusals_name_the_message_and_install_nothing() {
        if !in_own_network_namespace(
            "capture::netlink::tests::kernel_refusals_name_the_message_and_install_nothing",
        ) {
            return;
        }
        assert_eq!(ruleset(), "");
        // A nat chain at a priority the kernel refuses (at or before conntrack's, -200).
        let mut chains = nft::table(&rules());
        chains[1].priority = -300;
        let err = apply(&Batch::install(&chains)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "nf_tables refused rule \"chain output\": Operation not supported (os error 95)"
        );
        assert_eq!(err.exit_code(), 71);
        assert_eq!(ruleset(), "", "a refused batch left rules behind");

        // A rule with an expression the kernel does not know, between good ones.
        let chains = nft::table(&rules());
        let mut batch = Batch::begin();
        batch.push("table inet outrider", new_table);
        batch.push("chain inbound", |seq| new_chain(seq, &chains[0]));
        batch.push("admin port", |seq| {
            new_rule(seq, "inbound", &chains[0].rules[0])
        });
        batch.push("bad rule", |seq| {
            let mut m = Message::nftables(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, seq);
            m.string(NFTA_RULE_TABLE, TABLE_NAME);
            m.string(NFTA_RULE_CHAIN, "inbound");
            m.nest(NFTA_RULE_EXPRESSIONS, |m| {
                m.expr("no-such-expression", |_| {})
            });
            m.finish()
        });
        batch.push("inbound to proxy", |seq| {
            new_rule(seq, "inbound", &chains[0].rules[1])
        });
        let err = apply(&batch.end()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "nf_tables refused rule \"bad rule\": No such file or directory (os error 2)"
        );
        assert_eq!(ruleset(), "", "a refused batch left rules behind");

        // The same installation goes in whole, twice, and comes out whole.
        let install = Batch::install(&nft::table(&rules()));
        apply(&install).unwrap();
        let installed = ruleset();
        assert!(installed.contains("redirect to :15006"), "{installed}");
        apply(&install).unwrap();
        assert_eq!(ruleset(), installed);
        apply(&Batch::cleanup()).unwrap();
        assert_eq!(ruleset(), "");
        apply(&Batch::cleanup()).unwrap();
    }
}
