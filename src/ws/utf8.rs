//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! What it is for: validating a text message fragment by fragment (and a frame as its bytes
//! arrive) so that an invalid sequence fails the connection as soon as it is complete, while
//! a code point split across two pieces is accepted. Uses `simdutf8` for the bulk.
//! What it must never do: copy or buffer more than the ≤ 3 bytes of an unfinished code point.

/// Validator state: the bytes of a code point that the previous piece left unfinished.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Utf8Stream {
    carry: [u8; 4],
    carry_len: u8,
}

/// A complete invalid UTF-8 sequence was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InvalidUtf8;

/// Length of the sequence a lead byte starts; 0 for bytes that cannot start one.
fn seq_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7F => 1,
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 0,
    }
}

impl Utf8Stream {
    /// Forgets any carried partial code point (start of a new message).
    pub(crate) fn reset(&mut self) {
        self.carry_len = 0;
    }

    /// Validates the next piece of the stream.
    pub(crate) fn feed(&mut self, mut input: &[u8]) -> Result<(), InvalidUtf8> {
        if self.carry_len > 0 {
            let have = usize::from(self.carry_len);
            let need = seq_len(self.carry[0]).saturating_sub(have);
            let take = need.min(input.len());
            let mut tmp = self.carry;
            tmp[have..have + take].copy_from_slice(&input[..take]);
            match simdutf8::compat::from_utf8(&tmp[..have + take]) {
                Ok(_) => {
                    self.carry_len = 0;
                    input = &input[take..];
                }
                Err(e) if e.error_len().is_none() && take == input.len() => {
                    // still unfinished and the piece is used up
                    self.carry = tmp;
                    self.carry_len = (have + take) as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
        }
        if simdutf8::basic::from_utf8(input).is_ok() {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(input) {
            Ok(_) => Ok(()),
            Err(e) => match e.error_len() {
                Some(_) => Err(InvalidUtf8),
                None => {
                    let rest = &input[e.valid_up_to()..];
                    // an unfinished sequence is at most 3 bytes
                    if rest.len() > 3 {
                        return Err(InvalidUtf8);
                    }
                    self.carry[..rest.len()].copy_from_slice(rest);
                    self.carry_len = rest.len() as u8;
                    Ok(())
                }
            },
        }
    }

    /// Checks that the stream did not end inside a code point.
    pub(crate) fn finish(&self) -> Result<(), InvalidUtf8> {
        if self.carry_len == 0 {
            Ok(())
        } else {
            Err(InvalidUtf8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(pieces: &[&[u8]]) -> Result<(), InvalidUtf8> {
        let mut s = Utf8Stream::default();
        for p in pieces {
            s.feed(p)?;
        }
        s.finish()
    }

    #[test]
    fn split_code_points() {
        let euro = "€".as_bytes(); // E2 82 AC
        assert_eq!(run(&[&euro[..1], &euro[1..]]), Ok(()));
        assert_eq!(run(&[&euro[..2], &euro[2..]]), Ok(()));
        assert_eq!(run(&[&euro[..1], &euro[1..2], &euro[2..]]), Ok(()));
        assert_eq!(run(&[&euro[..1], &[], &euro[1..]]), Ok(()));
        let emoji = "a😀b".as_bytes();
        for cut in 0..=emoji.len() {
            assert_eq!(run(&[&emoji[..cut], &emoji[cut..]]), Ok(()), "cut {cut}");
        }
    }

    #[test]
    fn unfinished_at_end_fails() {
        assert_eq!(run(&[&[0xE2, 0x82]]), Err(InvalidUtf8));
    }

    #[test]
    fn invalid_fails_on_the_piece_that_completes_it() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.feed(b"ok"), Ok(()));
        assert_eq!(s.feed(&[0xED]), Ok(()), "could still be valid");
        // ED A0 is a surrogate prefix: invalid as soon as the second byte is seen
        assert_eq!(s.feed(&[0xA0]), Err(InvalidUtf8));
        let mut s = Utf8Stream::default();
        assert_eq!(s.feed(&[b'a', 0xFF]), Err(InvalidUtf8));
        let mut s = Utf8Stream::default();
        assert_eq!(s.feed(&[0xF4]), Ok(()));
        assert_eq!(s.feed(&[0x90]), Err(InvalidUtf8), "above U+10FFFF");
    }

    proptest! {
        #[test]
        fn matches_std_on_any_split(
            data in proptest::collection::vec(
                prop_oneof![any::<u8>(), Just(0xE2u8), Just(0x82u8), Just(0xACu8), Just(b'a')],
                0..40),
            cuts in proptest::collection::vec(0usize..40, 0..5),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut last = 0;
            for c in cuts {
                pieces.push(&data[last..c]);
                last = c;
            }
            pieces.push(&data[last..]);
            let expect = std::str::from_utf8(&data).is_ok();
            prop_assert_eq!(run(&pieces).is_ok(), expect);
        }

        #[test]
        fn valid_strings_pass_byte_at_a_time(s in "\\PC{0,20}") {
            let bytes = s.as_bytes();
            let pieces: Vec<&[u8]> = bytes.chunks(1).collect();
            prop_assert_eq!(run(&pieces), Ok(()));
        }
    }
}
