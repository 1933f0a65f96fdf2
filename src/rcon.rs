//! RCON client: the Source RCON protocol as Minecraft speaks it.
//!
//! Minecraft's RCON differs from the Source description in ways a client has to respect:
//! - it reads each request with one 1460-byte socket read and drops the connection when the read does
//!   not hold exactly one packet, so a command is at most [`MAX_COMMAND_LEN`] bytes and a client must
//!   not send a second packet before the first one has been answered;
//! - it splits a long reply over several type-0 packets of at most 4096 characters and never marks the
//!   last one. [`RconClient::command`] waits for the first packet, then sends a marker request (type 0,
//!   which Minecraft answers with "Unknown request 0") and collects packets until the marker's answer
//!   arrives: Minecraft handles one connection's requests in order, so the whole reply came before it;
//! - a wrong password is answered with request id -1.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout_at};

/// The longest command Minecraft accepts, in bytes: its 1460-byte read buffer less the 14 bytes of
/// length, id, type and the two terminating NULs.
pub const MAX_COMMAND_LEN: usize = 1446;

/// Packet types (Minecraft's `SERVERDATA_*`).
const TYPE_RESPONSE_VALUE: i32 = 0;
const TYPE_EXEC_COMMAND: i32 = 2;
const TYPE_AUTH_RESPONSE: i32 = 2;
const TYPE_AUTH: i32 = 3;

/// The request id Minecraft answers a refused login (or a command before login) with.
const AUTH_FAILURE_ID: i32 = -1;

/// Id, type and the two NULs: the smallest possible value of a packet's length field.
const PACKET_OVERHEAD: usize = 10;

/// The largest packet accepted from the server. Minecraft cuts replies at 4096 characters (not bytes),
/// and a character is at most 4 bytes of UTF-8.
const MAX_INCOMING_PACKET: usize = 4 * 4096 + PACKET_OVERHEAD;

/// What went wrong talking to a server's RCON port.
#[derive(Debug, thiserror::Error)]
pub enum RconError {
    /// The TCP connection to the RCON port could not be opened.
    #[error(
        "cannot connect to RCON at {addr}: check that the server is running with enable-rcon=true and that \
         rcon.port in server.properties is {port}",
        port = addr.port()
    )]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// Why the connection failed.
        #[source]
        source: io::Error,
    },

    /// The server refused the password (it answered with request id -1).
    #[error("RCON refused the password: check that rcon.password in server.properties matches the configured one")]
    Auth,

    /// The server did not answer within the configured timeout.
    #[error(
        "RCON at {addr} did not answer {operation} within {timeout:?}: check that the server is running and \
         its server thread is not stalled (long GC pauses, a hung mod)"
    )]
    Timeout {
        /// The address of the server.
        addr: SocketAddr,
        /// What was waited for: "connect", "login" or "command".
        operation: &'static str,
        /// The timeout that passed.
        timeout: Duration,
    },

    /// The connection failed after it was opened (reset, closed by the server, write error).
    #[error("the RCON connection failed: the server may have stopped, restarted or closed it")]
    Io(#[source] io::Error),

    /// The command is longer than Minecraft accepts; it was not sent.
    #[error("the RCON command is {len} bytes, over Minecraft's limit of {MAX_COMMAND_LEN}: it was not sent")]
    CommandTooLong {
        /// The command's length in bytes.
        len: usize,
    },

    /// The peer broke the protocol (a malformed or oversized packet).
    #[error("RCON protocol error: {0}; check that the RCON port belongs to a Minecraft server")]
    Protocol(String),
}

impl RconError {
    /// A short static word for metrics labels, events and log fields.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Auth => "auth",
            Self::Timeout { .. } => "timeout",
            Self::Io(_) => "io",
            Self::CommandTooLong { .. } => "too_long",
            Self::Protocol(_) => "protocol",
        }
    }
}

/// One RCON packet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Packet {
    id: i32,
    kind: i32,
    body: Vec<u8>,
}

impl Packet {
    /// Appends the wire form: length, id, type (all little-endian i32), body, two NULs.
    fn encode(&self, out: &mut BytesMut) -> Result<(), RconError> {
        let len = i32::try_from(self.body.len() + PACKET_OVERHEAD)
            .map_err(|_| RconError::Protocol(format!("a {}-byte packet body cannot be framed", self.body.len())))?;
        out.reserve(4 + self.body.len() + PACKET_OVERHEAD);
        out.put_i32_le(len);
        out.put_i32_le(self.id);
        out.put_i32_le(self.kind);
        out.put_slice(&self.body);
        out.put_slice(&[0, 0]);
        Ok(())
    }

    /// Takes one packet off the front of `buf`, or returns `None` while it is incomplete.
    fn decode(buf: &mut BytesMut) -> Result<Option<Packet>, RconError> {
        let Some(len_bytes) = buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = i32::from_le_bytes(*len_bytes);
        let len = usize::try_from(len)
            .ok()
            .filter(|len| (PACKET_OVERHEAD..=MAX_INCOMING_PACKET).contains(len))
            .ok_or_else(|| {
                RconError::Protocol(format!("packet length {len} is outside {PACKET_OVERHEAD}..={MAX_INCOMING_PACKET}"))
            })?;
        if buf.len() < 4 + len {
            return Ok(None);
        }
        buf.advance(4);
        let mut frame = buf.split_to(len);
        let id = frame.get_i32_le();
        let kind = frame.get_i32_le();
        if frame[frame.len() - 2..] != [0, 0] {
            return Err(RconError::Protocol("packet does not end with two NUL bytes".to_owned()));
        }
        frame.truncate(frame.len() - 2);
        Ok(Some(Packet { id, kind, body: frame.to_vec() }))
    }
}

/// One authenticated RCON connection. Commands run one at a time (`&mut self`); after an error other
/// than [`RconError::CommandTooLong`] the connection is abandoned and every later command fails with
/// [`RconError::Io`]: connect again, or use [`Rcon`], which does so by itself.
#[derive(Debug)]
pub struct RconClient {
    stream: TcpStream,
    addr: SocketAddr,
    timeout: Duration,
    read_buf: BytesMut,
    last_id: i32,
    broken: bool,
}

impl RconClient {
    /// Opens a TCP connection to `addr` and logs in with `password`; both steps together are bounded
    /// by `timeout`, which also bounds each later [`RconClient::command`].
    pub async fn connect(addr: SocketAddr, password: &str, timeout: Duration) -> Result<Self, RconError> {
        if password.len() > MAX_COMMAND_LEN {
            // Minecraft would drop the connection rather than answer.
            return Err(RconError::Protocol(format!(
                "the password is {} bytes, over Minecraft's limit of {MAX_COMMAND_LEN}",
                password.len()
            )));
        }
        let deadline = Instant::now() + timeout;
        let stream = timeout_at(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| RconError::Timeout { addr, operation: "connect", timeout })?
            .map_err(|source| RconError::Connect { addr, source })?;
        // Requests and replies alternate, so Nagle's algorithm would only add delay.
        stream.set_nodelay(true).map_err(RconError::Io)?;
        let mut client =
            Self { stream, addr, timeout, read_buf: BytesMut::with_capacity(8192), last_id: 0, broken: false };
        timeout_at(deadline, client.login(password)).await.map_err(|_| RconError::Timeout {
            addr,
            operation: "login",
            timeout,
        })??;
        tracing::debug!(%addr, "RCON connected");
        Ok(client)
    }

    /// Runs `command` (without a leading slash) and returns its whole reply, reassembled from as many
    /// packets as the server split it into. Refuses commands over [`MAX_COMMAND_LEN`] bytes without
    /// sending them.
    pub async fn command(&mut self, command: &str) -> Result<String, RconError> {
        let timeout = self.timeout;
        self.command_with_timeout(command, timeout).await
    }

    /// [`RconClient::command`] bounded by `timeout` instead of the connection's: for a command known to take
    /// longer than usual (`save-all flush` on a big world).
    pub async fn command_with_timeout(&mut self, command: &str, timeout: Duration) -> Result<String, RconError> {
        if command.len() > MAX_COMMAND_LEN {
            return Err(RconError::CommandTooLong { len: command.len() });
        }
        if self.broken {
            return Err(RconError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection was abandoned after an earlier error",
            )));
        }
        // Until the exchange completes, the stream may hold half a reply: only success clears this.
        self.broken = true;
        let addr = self.addr;
        let reply = tokio::time::timeout(timeout, self.exchange(command)).await.map_err(|_| RconError::Timeout {
            addr,
            operation: "command",
            timeout,
        })??;
        self.broken = false;
        Ok(reply)
    }

    async fn login(&mut self, password: &str) -> Result<(), RconError> {
        let id = self.next_id();
        self.send(Packet { id, kind: TYPE_AUTH, body: password.as_bytes().to_vec() }).await?;
        loop {
            let packet = self.read_packet().await?;
            if packet.id == AUTH_FAILURE_ID {
                return Err(RconError::Auth);
            }
            // Source servers send an empty RESPONSE_VALUE before the auth response; Minecraft does not.
            if packet.id == id && packet.kind == TYPE_AUTH_RESPONSE {
                return Ok(());
            }
            tracing::debug!(id = packet.id, kind = packet.kind, "ignoring RCON packet during login");
        }
    }

    async fn exchange(&mut self, command: &str) -> Result<String, RconError> {
        let id = self.next_id();
        self.send(Packet { id, kind: TYPE_EXEC_COMMAND, body: command.as_bytes().to_vec() }).await?;
        let mut reply = self.read_reply_packet(id, None).await?;
        // Only now is the command's packet consumed, so the marker arrives in a read of its own.
        let marker = self.next_id();
        self.send(Packet { id: marker, kind: TYPE_RESPONSE_VALUE, body: Vec::new() }).await?;
        loop {
            let packet = self.read_reply_packet(id, Some(marker)).await?;
            if packet.id == marker {
                break;
            }
            reply.body.extend_from_slice(&packet.body);
        }
        // Minecraft cuts by UTF-16 characters, which may split a surrogate pair: replace, don't fail.
        Ok(String::from_utf8_lossy(&reply.body).into_owned())
    }

    /// The next packet answering `id` (or `marker`), skipping late answers to abandoned requests.
    async fn read_reply_packet(&mut self, id: i32, marker: Option<i32>) -> Result<Packet, RconError> {
        loop {
            let packet = self.read_packet().await?;
            if packet.id == AUTH_FAILURE_ID {
                return Err(RconError::Auth);
            }
            if packet.id == id || Some(packet.id) == marker {
                return Ok(packet);
            }
            tracing::debug!(id = packet.id, expected = id, "ignoring RCON packet for another request");
        }
    }

    async fn send(&mut self, packet: Packet) -> Result<(), RconError> {
        let mut out = BytesMut::new();
        packet.encode(&mut out)?;
        self.stream.write_all(&out).await.map_err(RconError::Io)
    }

    async fn read_packet(&mut self) -> Result<Packet, RconError> {
        loop {
            if let Some(packet) = Packet::decode(&mut self.read_buf)? {
                return Ok(packet);
            }
            let read = self.stream.read_buf(&mut self.read_buf).await.map_err(RconError::Io)?;
            if read == 0 {
                return Err(RconError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the RCON connection",
                )));
            }
        }
    }

    fn next_id(&mut self) -> i32 {
        self.last_id = following_id(self.last_id);
        self.last_id
    }
}

/// Request ids stay positive: -1 means "auth failure" and 0 is what careless servers echo.
fn following_id(last: i32) -> i32 {
    if last >= i32::MAX - 1 { 1 } else { last + 1 }
}

/// A reconnecting RCON handle, cheap to clone and share between tasks. It connects on first use and
/// keeps one connection; commands from all clones run one at a time over it. When a command fails with
/// an I/O error on a connection opened earlier (the server restarted, or the connection dropped), it
/// reconnects once and runs the command again, so a command may run twice if the connection broke
/// after the server received it. Each connect and each command attempt is bounded by the timeout.
#[derive(Clone)]
pub struct Rcon {
    inner: Arc<Shared>,
}

struct Shared {
    addr: SocketAddr,
    password: String,
    timeout: Duration,
    conn: Mutex<Option<RconClient>>,
}

impl fmt::Debug for Rcon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("Rcon").field("addr", &self.inner.addr).field("timeout", &self.inner.timeout).finish()
    }
}

impl Rcon {
    /// A handle for the RCON port at `addr`; nothing is dialled until the first command.
    pub fn new(addr: SocketAddr, password: String, timeout: Duration) -> Self {
        Self { inner: Arc::new(Shared { addr, password, timeout, conn: Mutex::new(None) }) }
    }

    /// The RCON address this handle talks to.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Runs `command` and returns its reply, connecting first if needed (see [`Rcon`] for retries).
    pub async fn command(&self, command: &str) -> Result<String, RconError> {
        self.command_with_timeout(command, self.inner.timeout).await
    }

    /// [`Rcon::command`] with each attempt bounded by `timeout` instead of the handle's (connecting still uses
    /// the handle's): for a command known to take longer than usual (`save-all flush` on a big world).
    pub async fn command_with_timeout(&self, command: &str, timeout: Duration) -> Result<String, RconError> {
        if command.len() > MAX_COMMAND_LEN {
            return Err(RconError::CommandTooLong { len: command.len() });
        }
        let mut slot = self.inner.conn.lock().await;
        let (mut client, reused) = match slot.take() {
            Some(client) => (client, true),
            None => (self.connect().await?, false),
        };
        match client.command_with_timeout(command, timeout).await {
            Ok(reply) => {
                *slot = Some(client);
                Ok(reply)
            }
            Err(RconError::Io(error)) if reused => {
                tracing::warn!(addr = %self.inner.addr, %error, "RCON connection lost; reconnecting once");
                let mut client = self.connect().await?;
                let reply = client.command_with_timeout(command, timeout).await?;
                *slot = Some(client);
                Ok(reply)
            }
            // The connection may be mid-reply: drop it, the next command reconnects.
            Err(error) => Err(error),
        }
    }

    async fn connect(&self) -> Result<RconClient, RconError> {
        RconClient::connect(self.inner.addr, &self.inner.password, self.inner.timeout).await
    }
}

/// The reply to `list`: how many players are online, the server's limit, and their names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayerList {
    /// Players online.
    pub online: u32,
    /// The server's `max-players`.
    pub max: u32,
    /// Names of the players online, in the server's order (may be fewer than `online` when a plugin
    /// hides some).
    pub names: Vec<String>,
}

/// Parses the reply to `list`: "There are 3 of a max of 20 players online: a, b, c" (1.13 and later)
/// or the older "There are 3/20 players online:a, b, c". Formatting codes (`§x`) are ignored. Returns
/// `None` for anything else.
pub fn parse_list(reply: &str) -> Option<PlayerList> {
    let plain = strip_formatting(reply);
    let rest = plain.trim_start().strip_prefix("There are ")?;
    let (counts, names) = rest.split_once(" players online:")?;
    let (online, max) = match counts.split_once(" of a max of ") {
        Some(pair) => pair,
        None => counts.split_once('/')?,
    };
    let names = names.split([',', '\n']).map(str::trim).filter(|name| !name.is_empty()).map(str::to_owned).collect();
    Some(PlayerList { online: online.trim().parse().ok()?, max: max.trim().parse().ok()?, names })
}

/// Removes Minecraft's `§` formatting codes (the section sign and the character after it).
fn strip_formatting(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '§' {
            chars.next();
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), RconError>;

    fn encoded(packet: &Packet) -> Result<BytesMut, RconError> {
        let mut out = BytesMut::new();
        packet.encode(&mut out)?;
        Ok(out)
    }

    #[test]
    fn encodes_little_endian_with_two_nuls() -> TestResult {
        let bytes = encoded(&Packet { id: 7, kind: TYPE_EXEC_COMMAND, body: b"list".to_vec() })?;
        assert_eq!(&bytes[..], &[14, 0, 0, 0, 7, 0, 0, 0, 2, 0, 0, 0, b'l', b'i', b's', b't', 0, 0]);
        Ok(())
    }

    #[test]
    fn decodes_what_it_encodes_and_waits_for_whole_packets() -> TestResult {
        let first = Packet { id: 1, kind: TYPE_RESPONSE_VALUE, body: "héllo".as_bytes().to_vec() };
        let second = Packet { id: -1, kind: TYPE_AUTH_RESPONSE, body: Vec::new() };
        let mut wire = encoded(&first)?;
        wire.extend_from_slice(&encoded(&second)?);

        // Fed one byte at a time, as a slow network would.
        let mut partial = BytesMut::new();
        let mut decoded = Vec::new();
        for byte in wire {
            partial.put_u8(byte);
            while let Some(packet) = Packet::decode(&mut partial)? {
                decoded.push(packet);
            }
        }
        assert_eq!(decoded, [first, second]);
        assert!(partial.is_empty());
        Ok(())
    }

    #[test]
    fn decodes_a_full_size_minecraft_packet() -> TestResult {
        let body = vec![b'x'; 4096];
        let mut wire = encoded(&Packet { id: 3, kind: TYPE_RESPONSE_VALUE, body: body.clone() })?;
        let packet = Packet::decode(&mut wire)?;
        assert_eq!(packet.map(|p| p.body), Some(body));
        Ok(())
    }

    #[test]
    fn decode_refuses_bad_lengths_and_padding() -> TestResult {
        for len in [9, -5, i32::MAX] {
            let mut wire = BytesMut::new();
            wire.put_i32_le(len);
            assert!(matches!(Packet::decode(&mut wire), Err(RconError::Protocol(_))), "length {len}");
        }
        let mut unpadded = encoded(&Packet { id: 1, kind: 0, body: b"ab".to_vec() })?;
        let last = unpadded.len() - 1;
        unpadded[last] = b'!';
        assert!(matches!(Packet::decode(&mut unpadded), Err(RconError::Protocol(_))));
        Ok(())
    }

    #[test]
    fn ids_stay_positive_when_wrapping() {
        assert_eq!(following_id(0), 1);
        assert_eq!(following_id(41), 42);
        assert_eq!(following_id(i32::MAX - 1), 1);
        assert_eq!(following_id(i32::MAX), 1);
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn parses_modern_list() {
        assert_eq!(
            parse_list("There are 3 of a max of 20 players online: alice, bob, carol"),
            Some(PlayerList { online: 3, max: 20, names: names(&["alice", "bob", "carol"]) })
        );
        assert_eq!(
            parse_list("There are 0 of a max of 20 players online: "),
            Some(PlayerList { online: 0, max: 20, names: vec![] })
        );
    }

    #[test]
    fn parses_old_list_forms() {
        assert_eq!(
            parse_list("There are 2/10 players online:alice, bob"),
            Some(PlayerList { online: 2, max: 10, names: names(&["alice", "bob"]) })
        );
        assert_eq!(
            parse_list("There are 1/10 players online:\nalice"),
            Some(PlayerList { online: 1, max: 10, names: names(&["alice"]) })
        );
        assert_eq!(
            parse_list("§6There are §c1§6/§c5§6 players online:§r alice"),
            Some(PlayerList { online: 1, max: 5, names: names(&["alice"]) })
        );
    }

    #[test]
    fn refuses_other_replies() {
        assert_eq!(parse_list("Unknown or incomplete command, see below for error"), None);
        assert_eq!(parse_list("There are many of a max of 20 players online: a"), None);
        assert_eq!(parse_list("There are 3 players"), None);
        assert_eq!(parse_list(""), None);
    }

    #[test]
    fn categories_are_short_words() {
        let io = || io::Error::other("x");
        let addr = SocketAddr::from(([127, 0, 0, 1], 25575));
        let errors = [
            (RconError::Connect { addr, source: io() }, "connect"),
            (RconError::Auth, "auth"),
            (RconError::Timeout { addr, operation: "login", timeout: Duration::from_secs(1) }, "timeout"),
            (RconError::Io(io()), "io"),
            (RconError::CommandTooLong { len: 2000 }, "too_long"),
            (RconError::Protocol("x".into()), "protocol"),
        ];
        for (error, category) in errors {
            assert_eq!(error.category(), category, "{error}");
        }
    }
}
