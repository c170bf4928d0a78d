//! DATA and BDAT content (`smtp::data::DataDecoder`) and the `Received:`
//! count (`HeaderScan`). Input: a flags byte (bit 0: BDAT framing, bit 1:
//! bare LF normalised to CRLF), a byte that picks where to split, then what
//! the client sent after the DATA command's CRLF (or the BDAT chunks).
//!
//! Asserts:
//! * DATA ends at the first `CRLF.CRLF` of the stream (the DATA command's
//!   CRLF counting as the first CRLF), and only there; BDAT never ends.
//! * The output is exactly the content undone of its stuffing: a dot that
//!   starts a line (after CRLF; a bare CR or LF never starts one) is
//!   dropped, every other byte kept, a bare LF or bare CR rewritten to CRLF
//!   only when asked; only a CR whose LF may still come is held back.
//! * Fed in pieces, split anywhere, the decoder gives the same output and
//!   the same end; so does the `Received:` count.
//! * Relayed on, the content survives: what the delivery client's
//!   dot-stuffing sends for it decodes to the same bytes and ends exactly
//!   at its end-of-data mark (the session's normalising mode, where no
//!   bare LF is left).
//!
//! Not asserted, because it is false: "the output never holds CRLF.CRLF
//! unless the input did": `..` unstuffs to `.`, and a normalised `\n.\n`
//! becomes `\r\n.\r\n`; harmless, since the delivery client stuffs again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay::delivery::client::DotStuffer;
use mxrelay::smtp::data::{DataDecoder, Framing, HeaderScan};

fuzz_target!(|data: &[u8]| {
    let [flags, cut, input @ ..] = data else { return };
    let framing = if flags & 1 == 1 { Framing::Chunked } else { Framing::Dot };
    let normalise = flags & 2 == 2;

    let (out, end) = decode_whole(framing, normalise, input);

    // Where it ends: the first CRLF.CRLF, counting the command's CRLF.
    let mut stream = b"\r\n".to_vec();
    stream.extend_from_slice(input);
    let first_mark = stream.windows(5).position(|w| w == b"\r\n.\r\n").map(|i| i + 5 - 2);
    match framing {
        Framing::Dot => assert_eq!(end, first_mark, "end of data"),
        Framing::Chunked => assert_eq!(end, None, "BDAT has no end mark"),
    }

    // What comes out.
    let content = &input[..end.map_or(input.len(), |n| n - 3)];
    let mut expected = unstuff(content, framing == Framing::Dot, normalise);
    if end.is_none() && framing == Framing::Dot && input.last() == Some(&b'\r') {
        expected.pop(); // the CR of a CRLF that has not come yet
    }
    let mut finished = out.clone();
    if framing == Framing::Chunked {
        let mut d = DataDecoder::new(framing, normalise);
        let mut o = Vec::new();
        assert_eq!(d.feed(input, &mut o), None);
        d.finish(&mut o);
        finished = o;
    }
    assert_eq!(finished, expected, "decoded content");

    // Split anywhere: one cut, then pieces of a few bytes.
    let at = (*cut as usize * input.len()) / 255;
    let step = (*cut as usize % 7) + 1;
    let mut pieces = vec![&input[..at.min(input.len())], &input[at.min(input.len())..]];
    assert_eq!(decode_pieces(framing, normalise, &pieces), (out.clone(), end), "split at {at}");
    pieces = input.chunks(step).collect();
    assert_eq!(decode_pieces(framing, normalise, &pieces), (out.clone(), end), "pieces of {step}");

    let mut whole = HeaderScan::default();
    whole.feed(&out);
    let mut split = HeaderScan::default();
    out.chunks(step).for_each(|c| split.feed(c));
    assert_eq!(split.received, whole.received, "Received: count split in pieces of {step}");

    // Relayed on: the delivery client's stuffing and our own decoder agree.
    if normalise {
        assert!(
            finished.windows(2).all(|w| (w[1] != b'\n' || w[0] == b'\r') && (w[0] != b'\r' || w[1] == b'\n'))
                && finished.first() != Some(&b'\n'),
            "bare LF or CR left after normalising"
        );
        let mut sent = Vec::new();
        let mut stuffer = DotStuffer::default();
        finished.chunks(step).for_each(|c| stuffer.encode(c, &mut sent));
        stuffer.finish(&mut sent);
        let (relayed, relayed_end) = decode_whole(Framing::Dot, false, &sent);
        assert_eq!(relayed_end, Some(sent.len()), "relayed copy ends early or never");
        let mut want = finished.clone();
        if !want.is_empty() && !want.ends_with(b"\n") {
            want.extend_from_slice(b"\r\n");
        }
        assert_eq!(relayed, want, "relayed copy differs");
    }
});

fn decode_whole(framing: Framing, normalise: bool, input: &[u8]) -> (Vec<u8>, Option<usize>) {
    decode_pieces(framing, normalise, &[input])
}

/// Feeds the pieces in order until the end of data, as the session does.
fn decode_pieces(framing: Framing, normalise: bool, pieces: &[&[u8]]) -> (Vec<u8>, Option<usize>) {
    let mut d = DataDecoder::new(framing, normalise);
    let mut out = Vec::new();
    let mut offset = 0;
    for piece in pieces {
        if let Some(n) = d.feed(piece, &mut out) {
            return (out, Some(offset + n));
        }
        offset += piece.len();
    }
    (out, None)
}

/// The reference: RFC 5321 §4.5.2 transparency undone, byte by byte.
fn unstuff(content: &[u8], dots: bool, normalise: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut line_start = true;
    for (i, &b) in content.iter().enumerate() {
        if dots && line_start && b == b'.' {
            line_start = false;
            continue;
        }
        line_start = false;
        if b == b'\n' {
            if i > 0 && content[i - 1] == b'\r' {
                line_start = true;
            } else if normalise {
                out.push(b'\r');
            }
        }
        if b == b'\r' && normalise {
            // A CR without its LF is bare; at the very end only BDAT LAST
            // makes it one (DATA still waits for the LF).
            let bare = match content.get(i + 1) {
                Some(next) => *next != b'\n',
                None => !dots,
            };
            if bare {
                out.extend_from_slice(b"\r\n");
                continue;
            }
        }
        out.push(b);
    }
    out
}
