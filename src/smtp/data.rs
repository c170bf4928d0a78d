//! Message content decoding, pure and streaming.
//!
//! [`DataDecoder`] undoes DATA's dot-stuffing and finds the end of data.
//! Invariant: only `CRLF.CRLF` ends DATA (RFC 5321 §4.1.1.4). A bare LF or
//! bare CR never starts a line for this purpose, so `\n.\n`, `\n.\r\n`,
//! `\r.\r` and `\r\n.\r` cannot end a message early or smuggle a second one
//! (the CVE-2023-51764 class). A bare LF or bare CR (RFC 5321 §2.3.8: CR and
//! LF only as CRLF) is recorded so that the session can refuse the message
//! (Postfix `smtpd_forbid_bare_newline`) or, when asked, is rewritten to
//! CRLF, so that no next hop that ends DATA at `<CR>.<CR>` or `<LF>.<LF>`
//! sees a second message in what we relay. A rewritten line break never
//! starts a line for the end-of-data rule. BDAT content goes through the
//! same decoder without the dot rules.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (after CRLF; the DATA command's CRLF counts).
    LineStart,
    /// Saw `.` at the start of a line.
    Dot,
    /// Saw `.` CR at the start of a line.
    DotCr,
    /// Inside a line.
    Text,
    /// Saw CR inside a line.
    Cr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// DATA: dot-stuffed, ends at CRLF.CRLF.
    Dot,
    /// BDAT: length-framed, no dot rules.
    Chunked,
}

#[derive(Debug)]
pub struct DataDecoder {
    state: State,
    framing: Framing,
    normalise: bool,
    /// A bare LF or bare CR was seen in the content.
    pub bare_newline: bool,
}

impl DataDecoder {
    /// `normalise`: rewrite a bare LF or CR to CRLF (else kept as it came).
    pub fn new(framing: Framing, normalise: bool) -> DataDecoder {
        DataDecoder { state: State::LineStart, framing, normalise, bare_newline: false }
    }

    /// Decodes `input`, appending content to `out`. Returns `Some(n)` when
    /// the end-of-data mark ends at `input[n - 1]` (bytes after it are the
    /// next commands), `None` when all of `input` was content.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            // Inside a line (or at the start of one that is not a dot),
            // everything up to the next CR or LF is content as it came:
            // copied at once rather than byte by byte.
            let plain = match self.state {
                State::Text => true,
                State::LineStart => self.framing == Framing::Chunked || input[i] != b'.',
                _ => false,
            };
            if plain {
                let span = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
                if span > 0 {
                    out.extend_from_slice(&input[i..i + span]);
                    self.state = State::Text;
                    i += span;
                    continue;
                }
            }
            i += 1;
            if self.step(input[i - 1], out) {
                return Some(i);
            }
        }
        None
    }

    /// One byte through the state machine; `true` when it ends the data.
    fn step(&mut self, b: u8, out: &mut Vec<u8>) -> bool {
        match (self.state, b) {
            (State::LineStart, b'.') if self.framing == Framing::Dot => self.state = State::Dot,
            (State::LineStart | State::Text, _) => self.text(b, out),
            (State::Dot, b'\r') => self.state = State::DotCr,
            // The leading dot of any other line is stuffing: drop it.
            (State::Dot, _) => self.text(b, out),
            (State::DotCr, b'\n') => {
                self.state = State::LineStart;
                return true;
            }
            (State::Cr, b'\n') => {
                out.extend_from_slice(b"\r\n");
                self.state = State::LineStart;
            }
            // The CR before `b` was not followed by LF: a bare CR.
            (State::DotCr | State::Cr, _) => {
                self.bare(b'\r', out);
                self.text(b, out);
            }
        }
        false
    }

    fn text(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            b'\r' => self.state = State::Cr,
            b'\n' => self.bare(b'\n', out),
            _ => {
                out.push(b);
                self.state = State::Text;
            }
        }
    }

    /// A bare LF or CR: recorded, rewritten to CRLF when asked, and never a
    /// line start for the end-of-data rule.
    fn bare(&mut self, b: u8, out: &mut Vec<u8>) {
        self.bare_newline = true;
        if self.normalise {
            out.extend_from_slice(b"\r\n");
        } else {
            out.push(b);
        }
        self.state = State::Text;
    }

    /// For BDAT LAST: content that ended with a CR whose LF never came.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.state == State::Cr {
            self.bare(b'\r', out);
        }
    }
}

/// Counts `Received:` headers in the header section of decoded content,
/// fed in pieces, in constant memory.
#[derive(Debug, Default)]
pub struct HeaderScan {
    done: bool,
    mid_line: bool,
    prefix: Vec<u8>,
    pub received: usize,
}

const RECEIVED: &[u8] = b"received:";

impl HeaderScan {
    pub fn feed(&mut self, content: &[u8]) {
        for &b in content {
            if self.done {
                return;
            }
            if b == b'\n' {
                if !self.mid_line || self.prefix.as_slice() == b"\r" {
                    // An empty line ends the header section.
                    self.done = true;
                }
                self.mid_line = false;
                self.prefix.clear();
                continue;
            }
            self.mid_line = true;
            if self.prefix.len() < RECEIVED.len() {
                self.prefix.push(b.to_ascii_lowercase());
                if self.prefix.as_slice() == RECEIVED {
                    self.received += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(input: &[u8]) -> (Vec<u8>, Option<usize>, bool) {
        let mut d = DataDecoder::new(Framing::Dot, false);
        let mut out = Vec::new();
        let end = d.feed(input, &mut out);
        (out, end, d.bare_newline)
    }

    #[test]
    fn ends_only_at_crlf_dot_crlf() {
        let (out, end, _) = decode(b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<>\r\n");
        assert_eq!(out, b"Subject: x\r\n\r\nbody\r\n");
        assert_eq!(end, Some(23));
        // The DATA command's own CRLF starts the first line.
        assert_eq!(decode(b".\r\n").1, Some(3));
    }

    #[test]
    fn unstuffs_leading_dots() {
        let (out, end, _) = decode(b"..hidden\r\n...\r\n.\r\n");
        assert_eq!(out, b".hidden\r\n..\r\n");
        assert!(end.is_some());
    }

    #[test]
    fn smuggling_sequences_never_end_data() {
        for body in [&b"a\n.\nb"[..], b"a\n.\r\nb", b"a\r.\rb", b"a\r\n.\rb", b"a\r.\r\nb"] {
            let (_, end, _) = decode(body);
            assert_eq!(end, None, "{body:?} ended DATA");
        }
        for body in [&b"a\n.\nb"[..], b"a\r.\rb", b"a\r\n.\rb", b"a\rb\r\n", b"a\r\r\n"] {
            assert!(decode(body).2, "{body:?}: bare newline not seen");
        }
        assert!(!decode(b"a\r\nb\r\n").2);
    }

    #[test]
    fn normalises_bare_lf_and_cr_when_asked() {
        let mut d = DataDecoder::new(Framing::Dot, true);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"a\nb\rc\r\r\n.\rd\r\n.\r\n", &mut out), Some(16));
        // The rewritten breaks start no line: `.` after one is content.
        assert_eq!(out, b"a\r\nb\r\nc\r\n\r\n\r\nd\r\n");
        let mut d = DataDecoder::new(Framing::Dot, true);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"x\r.\ry\r\n.\r\n", &mut out), Some(10));
        assert_eq!(out, b"x\r\n.\r\ny\r\n");
    }

    #[test]
    fn chunked_trailing_cr_is_bare() {
        let mut d = DataDecoder::new(Framing::Chunked, true);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"a\r", &mut out), None);
        // A CR at the end of one chunk and LF at the start of the next: CRLF.
        d.feed(b"\nb\r", &mut out);
        assert!(!d.bare_newline);
        d.finish(&mut out);
        assert!(d.bare_newline);
        assert_eq!(out, b"a\r\nb\r\n");
    }

    #[test]
    fn chunked_has_no_dot_rules() {
        let mut d = DataDecoder::new(Framing::Chunked, false);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"..x\r\n.\r\n", &mut out), None);
        assert_eq!(out, b"..x\r\n.\r\n");
    }

    #[test]
    fn counts_received_headers() {
        let mut h = HeaderScan::default();
        h.feed(b"Received: a\r\n\tcont\r\nRECEIVED: b\r\nSubj");
        h.feed(b"ect: x\r\n\r\nReceived: in body\r\n");
        assert_eq!(h.received, 2);
    }

    /// The decoder one byte at a time, without the bulk copy of plain text.
    fn bytewise(framing: Framing, normalise: bool, input: &[u8]) -> (Vec<u8>, Option<usize>, bool) {
        let mut d = DataDecoder::new(framing, normalise);
        let mut out = Vec::new();
        let end = input.iter().position(|&b| d.step(b, &mut out)).map(|p| p + 1);
        (out, end, d.bare_newline)
    }

    proptest! {
        /// The bulk copy of plain text changes nothing: the same content,
        /// end and bare-newline verdict as byte by byte, in both framings.
        #[test]
        fn bulk_copy_is_bytewise(
            body in proptest::collection::vec(prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'a'), any::<u8>()], 0..200),
            chunked: bool,
            normalise: bool,
        ) {
            let framing = if chunked { Framing::Chunked } else { Framing::Dot };
            let mut d = DataDecoder::new(framing, normalise);
            let mut out = Vec::new();
            let end = d.feed(&body, &mut out);
            prop_assert_eq!((out, end, d.bare_newline), bytewise(framing, normalise, &body));
        }

        /// Split anywhere, the decoder gives the same answer as in one piece.
        #[test]
        fn split_invariant(body in proptest::collection::vec(prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'a')], 0..64), cut in 0usize..64) {
            let cut = cut.min(body.len());
            let (whole, end_whole, bare_whole) = decode(&body);
            let mut d = DataDecoder::new(Framing::Dot, false);
            let mut out = Vec::new();
            let end = match d.feed(&body[..cut], &mut out) {
                Some(n) => Some(n),
                None => d.feed(&body[cut..], &mut out).map(|n| n + cut),
            };
            prop_assert_eq!(end, end_whole);
            prop_assert_eq!(out, whole);
            prop_assert_eq!(d.bare_newline, bare_whole);
        }

        /// The end is found exactly at the first CRLF.CRLF, and only there:
        /// never at a bare CR or LF around a dot, never missed. (Pieces that
        /// make the sequence, or half of it, likely.)
        #[test]
        fn end_is_exactly_the_first_crlf_dot_crlf(
            pieces in proptest::collection::vec(prop_oneof![
                Just(&b"."[..]), Just(&b"\r"[..]), Just(&b"\n"[..]), Just(&b"a"[..]),
                Just(&b"\r\n"[..]), Just(&b"\r\n.\r\n"[..]), Just(&b"\n.\n"[..]), Just(&b"\r.\r"[..]),
            ], 0..24),
            normalise in proptest::bool::ANY,
        ) {
            let mut input = b"\r\n".to_vec();
            pieces.iter().for_each(|p| input.extend_from_slice(p));
            let mut d = DataDecoder::new(Framing::Dot, normalise);
            d.state = State::Text;
            let expected = input.windows(5).position(|w| w == b"\r\n.\r\n").map(|p| p + 5);
            prop_assert_eq!(d.feed(&input, &mut Vec::new()), expected, "{:?}", String::from_utf8_lossy(&input));
        }
    }
}
