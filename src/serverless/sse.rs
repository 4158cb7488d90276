//! An incremental server-sent events parser (the `text/event-stream` format of the WHATWG
//! HTML standard, §9.2), sans-IO: feed it bytes as they arrive, take the events it completed.
//!
//! It handles LF, CRLF and CR line ends (a CRLF split between two chunks is one line end),
//! a leading byte-order mark, `event`, `data` (several lines joined by `\n`), `id`, comments
//! (`:` lines) and ignores `retry` and unknown fields. An event whose data buffer stays empty
//! (no `data` line) is not dispatched, as the standard says; an event without `event` is a
//! `message`. Invalid UTF-8 becomes U+FFFD, line by line. What an unfinished event held when
//! the stream ends is discarded: the caller simply stops feeding.
//!
//! Bounded: the line being read plus the event being assembled may not exceed
//! `max_event_bytes`; past it `feed` fails with [`SseError::EventTooLarge`] and the parser
//! stays failed. Events completed before the failure can still be taken. The result does not
//! depend on how the input is split into chunks (a property test checks it).
//!
//! Must never: allocate past its bound, panic on any input, or read a clock.

use std::collections::VecDeque;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event` field, `message` when the event had none.
    pub event: String,
    /// The `data` lines joined by `\n`.
    pub data: String,
    /// The `id` field of this event, if it had one (ids containing NUL are ignored).
    pub id: Option<String>,
}

/// Why the parser stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("a server-sent event (or one of its lines) exceeds {limit} bytes")]
    EventTooLarge { limit: usize },
}

/// The parser state: the unfinished line, the event being assembled, completed events.
#[derive(Debug)]
pub struct SseParser {
    max_event_bytes: usize,
    line: Vec<u8>,
    /// The previous byte was a CR: an LF right after it ends no second line.
    after_cr: bool,
    /// No line was completed yet (a BOM may start it).
    first_line: bool,
    event: String,
    data: String,
    /// Whether a `data` field was seen (the standard's "data buffer is not empty").
    has_data: bool,
    id: Option<String>,
    /// Bytes held by `event`, `data` and `id`.
    held: usize,
    ready: VecDeque<SseEvent>,
    failed: Option<SseError>,
}

impl SseParser {
    /// A parser whose line plus event may hold at most `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        SseParser {
            max_event_bytes,
            line: Vec::new(),
            after_cr: false,
            first_line: true,
            event: String::new(),
            data: String::new(),
            has_data: false,
            id: None,
            held: 0,
            ready: VecDeque::new(),
            failed: None,
        }
    }

    /// Parse `input`; completed events are queued for [`SseParser::next_event`].
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), SseError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        while !input.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if input[0] == b'\n' {
                    input = &input[1..];
                    continue;
                }
            }
            match input.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(end) => {
                    self.extend_line(&input[..end])?;
                    self.after_cr = input[end] == b'\r';
                    input = &input[end + 1..];
                    self.end_line();
                }
                None => {
                    self.extend_line(input)?;
                    input = &[];
                }
            }
        }
        Ok(())
    }

    /// The next completed event, oldest first.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.held + self.line.len() + bytes.len() > self.max_event_bytes {
            let err = SseError::EventTooLarge {
                limit: self.max_event_bytes,
            };
            self.failed = Some(err.clone());
            self.line = Vec::new();
            return Err(err);
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn end_line(&mut self) {
        let mut line: &[u8] = &self.line;
        if self.first_line {
            self.first_line = false;
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch();
        } else if line[0] != b':' {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &[][..]),
            };
            let value = String::from_utf8_lossy(value);
            match field {
                b"event" => {
                    self.held = self.held - self.event.len() + value.len();
                    self.event = value.into_owned();
                }
                b"data" => {
                    self.data.push_str(&value);
                    self.data.push('\n');
                    self.held += value.len() + 1;
                    self.has_data = true;
                }
                b"id" if !value.contains('\0') => {
                    let old = self.id.as_ref().map_or(0, String::len);
                    self.held = self.held - old + value.len();
                    self.id = Some(value.into_owned());
                }
                // `retry` (a reconnection delay) and unknown fields are ignored.
                _ => {}
            }
        }
        self.line.clear();
    }

    fn dispatch(&mut self) {
        let event = std::mem::take(&mut self.event);
        let mut data = std::mem::take(&mut self.data);
        let id = self.id.take();
        self.held = 0;
        if !std::mem::take(&mut self.has_data) {
            return;
        }
        data.pop(); // the `\n` after the last data line
        let event = if event.is_empty() {
            "message".to_owned()
        } else {
            event
        };
        self.ready.push_back(SseEvent { event, data, id });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(input: &[u8], limit: usize) -> (Vec<SseEvent>, Option<SseError>) {
        let mut p = SseParser::new(limit);
        let res = p.feed(input);
        let mut out = Vec::new();
        while let Some(e) = p.next_event() {
            out.push(e);
        }
        (out, res.err())
    }

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.to_owned(),
            data: data.to_owned(),
            id: None,
        }
    }

    #[test]
    fn rivetkit_stream() {
        // What hono's `writeSSE` writes for rivetkit's init then a ping.
        let input = b"data: BwAABcO8bsOv//8=\n\nevent: ping\ndata: \n\n";
        let (events, err) = parse(input, 1024);
        assert_eq!(err, None);
        assert_eq!(
            events,
            vec![ev("message", "BwAABcO8bsOv//8="), ev("ping", "")]
        );
    }

    #[test]
    fn line_ends_and_multiline_data() {
        for input in [
            &b"event: a\r\ndata: x\r\ndata: y\r\n\r\n"[..],
            b"event: a\rdata: x\rdata: y\r\r",
            b"event: a\ndata: x\r\ndata: y\r\n\n",
        ] {
            let (events, err) = parse(input, 1024);
            assert_eq!(err, None);
            assert_eq!(events, vec![ev("a", "x\ny")], "{input:?}");
        }
    }

    #[test]
    fn fields() {
        let input = b"\xEF\xBB\xBF: a comment\nretry: 10\nid: 7\nunknown: z\ndata:no space\ndata\ndata:  two\n\n";
        let (events, err) = parse(input, 1024);
        assert_eq!(err, None);
        assert_eq!(
            events,
            vec![SseEvent {
                event: "message".into(),
                data: "no space\n\n two".into(),
                id: Some("7".into()),
            }]
        );
    }

    #[test]
    fn no_data_no_event() {
        // An event with only an `event` field is not dispatched; the next one starts clean.
        let (events, _) = parse(b"event: ping\n\ndata: d\n\n", 1024);
        assert_eq!(events, vec![ev("message", "d")]);
        let (events, _) = parse(b"id: a\0b\ndata: d\n\n", 1024);
        assert_eq!(events[0].id, None);
    }

    #[test]
    fn unfinished_event_is_not_dispatched() {
        let (events, err) = parse(b"data: a\n\ndata: b\n", 1024);
        assert_eq!(err, None);
        assert_eq!(events, vec![ev("message", "a")]);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let (events, _) = parse(b"data: \xFFok\n\n", 1024);
        assert_eq!(events, vec![ev("message", "\u{FFFD}ok")]);
    }

    #[test]
    fn event_size_is_bounded() {
        // One long line without an end.
        let mut p = SseParser::new(16);
        assert_eq!(
            p.feed(&[b'a'; 17]),
            Err(SseError::EventTooLarge { limit: 16 })
        );
        assert_eq!(p.feed(b"\n\n"), Err(SseError::EventTooLarge { limit: 16 }));
        // Many short data lines of one event.
        let (events, err) = parse(b"data: 1\n\ndata: 12345\ndata: 12345\ndata: 1\n\n", 16);
        assert_eq!(events, vec![ev("message", "1")]);
        assert_eq!(err, Some(SseError::EventTooLarge { limit: 16 }));
        // Events at the limit pass, one after another.
        let (events, err) = parse(b"data: 1234567\n\ndata: 1234567\n\n", 16);
        assert_eq!(err, None);
        assert_eq!(events.len(), 2);
    }

    fn piece() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"data: ".to_vec()),
            Just(b"data".to_vec()),
            Just(b"event: ping".to_vec()),
            Just(b"id: 1".to_vec()),
            Just(b": c".to_vec()),
            Just(b"retry: 5".to_vec()),
            Just(b"\xEF\xBB\xBF".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b":".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..6),
        ]
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_events(
            pieces in proptest::collection::vec(piece(), 0..40),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            limit in prop_oneof![Just(24usize), Just(4096usize)],
        ) {
            let input: Vec<u8> = pieces.concat();
            let whole = parse(&input, limit);

            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            at.sort_unstable();
            let mut p = SseParser::new(limit);
            let mut err = None;
            let mut start = 0;
            for end in at.into_iter().chain([input.len()]) {
                if let Err(e) = p.feed(&input[start..end]) {
                    err = Some(e);
                    break;
                }
                start = end;
            }
            let mut events = Vec::new();
            while let Some(e) = p.next_event() {
                events.push(e);
            }
            prop_assert_eq!((events, err), whole);
        }
    }
}
