//! Parsing one SMTP command line (RFC 5321 §4.1, RFC 1869 parameters,
//! RFC 3030 BDAT). Pure: bytes in, [`Command`] out.

use crate::proto::reply::Reply;

/// RFC 5321 §4.5.3.1.4: 512 octets for a command line, plus room for the
/// ESMTP parameters of MAIL/RCPT (RFC 1869 §4.1.2 allows each extension to
/// raise it).
pub const COMMAND_LINE_LIMIT: usize = 512 + 512;

/// ESMTP parameters of MAIL/RCPT (RFC 1869): upper-cased keyword, value.
pub type Params = Vec<(String, Option<String>)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    /// Raw path text (with its brackets) and the ESMTP parameters.
    Mail {
        path: String,
        params: Params,
    },
    Rcpt {
        path: String,
        params: Params,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Help,
    Vrfy,
    Expn,
    StartTls,
    /// RFC 4954: the SASL mechanism (upper-cased) and the initial response.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
    /// RFC 1985: start the queue for a domain (`example.org` or `@example.org`).
    Etrn(String),
    Unknown(String),
}

/// Why a line is not a command; each maps to exactly one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    Nul,
    NotUtf8,
    Syntax(&'static str),
}

impl CommandError {
    pub fn reply(&self) -> Reply {
        match self {
            CommandError::Nul => Reply::new(500, "5.5.2", "Error: NUL character in command"),
            CommandError::NotUtf8 => Reply::new(500, "5.5.2", "Error: command is not valid UTF-8"),
            CommandError::Syntax(usage) => Reply::syntax(usage),
        }
    }
}

/// Parses one line, without its line ending.
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    if line.contains(&0) {
        return Err(CommandError::Nul);
    }
    let line = std::str::from_utf8(line).map_err(|_| CommandError::NotUtf8)?;
    let line = line.trim_end_matches([' ', '\t']);
    let (verb, rest) = match line.find([' ', '\t']) {
        Some(i) => (&line[..i], line[i + 1..].trim_start()),
        None => (line, ""),
    };
    let verb = verb.to_ascii_uppercase();
    let no_args = |cmd: Command, usage: &'static str| {
        if rest.is_empty() { Ok(cmd) } else { Err(CommandError::Syntax(usage)) }
    };
    match verb.as_str() {
        "HELO" | "EHLO" => {
            if rest.is_empty() || rest.contains(char::is_whitespace) && verb == "HELO" {
                return Err(CommandError::Syntax(if verb == "HELO" { "HELO hostname" } else { "EHLO hostname" }));
            }
            // EHLO may carry trailing junk some clients send; keep the first word.
            let name = rest.split_whitespace().next().unwrap_or_default().to_string();
            Ok(if verb == "HELO" { Command::Helo(name) } else { Command::Ehlo(name) })
        }
        "MAIL" => {
            let arg = strip_keyword(rest, "FROM:").ok_or(CommandError::Syntax("MAIL FROM:<address>"))?;
            let (path, params) = split_path(arg).ok_or(CommandError::Syntax("MAIL FROM:<address>"))?;
            Ok(Command::Mail { path, params })
        }
        "RCPT" => {
            let arg = strip_keyword(rest, "TO:").ok_or(CommandError::Syntax("RCPT TO:<address>"))?;
            let (path, params) = split_path(arg).ok_or(CommandError::Syntax("RCPT TO:<address>"))?;
            Ok(Command::Rcpt { path, params })
        }
        "DATA" => no_args(Command::Data, "DATA"),
        "BDAT" => {
            let mut words = rest.split_whitespace();
            let size = words
                .next()
                .filter(|w| !w.is_empty() && w.len() <= 19 && w.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|w| w.parse::<u64>().ok())
                .ok_or(CommandError::Syntax("BDAT chunk-size [LAST]"))?;
            let last = match words.next() {
                None => false,
                Some(w) if w.eq_ignore_ascii_case("LAST") => true,
                Some(_) => return Err(CommandError::Syntax("BDAT chunk-size [LAST]")),
            };
            if words.next().is_some() {
                return Err(CommandError::Syntax("BDAT chunk-size [LAST]"));
            }
            Ok(Command::Bdat { size, last })
        }
        "RSET" => no_args(Command::Rset, "RSET"),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(Command::Quit, "QUIT"),
        "HELP" => Ok(Command::Help),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "STARTTLS" => no_args(Command::StartTls, "STARTTLS"),
        "AUTH" => {
            let mut words = rest.split_whitespace();
            let mechanism = words.next().ok_or(CommandError::Syntax("AUTH mechanism [initial-response]"))?;
            let initial = words.next().map(str::to_string);
            if words.next().is_some() {
                return Err(CommandError::Syntax("AUTH mechanism [initial-response]"));
            }
            Ok(Command::Auth { mechanism: mechanism.to_ascii_uppercase(), initial })
        }
        "ETRN" if !rest.is_empty() && !rest.contains(char::is_whitespace) => Ok(Command::Etrn(rest.to_string())),
        "ETRN" => Err(CommandError::Syntax("ETRN domain")),
        _ => Ok(Command::Unknown(verb)),
    }
}

/// `FROM:<a>` / `FROM: <a>` (the space is tolerated as Postfix does).
fn strip_keyword<'a>(rest: &'a str, keyword: &str) -> Option<&'a str> {
    // `get`: the bytes at the keyword's end may be inside a UTF-8 character.
    if !rest.get(..keyword.len()).is_some_and(|p| p.eq_ignore_ascii_case(keyword)) {
        return None;
    }
    Some(rest[keyword.len()..].trim_start())
}

/// Splits `<path> KEY=VALUE ...`. The path may contain quoted spaces; a path
/// without brackets runs to the first space (checked later by policy).
fn split_path(arg: &str) -> Option<(String, Params)> {
    if arg.is_empty() {
        return None;
    }
    let end = if arg.starts_with('<') {
        let mut quoted = false;
        let mut escaped = false;
        let mut end = None;
        for (i, c) in arg.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '>' if !quoted => {
                    end = Some(i + 1);
                    break;
                }
                _ => {}
            }
        }
        end?
    } else {
        arg.find(' ').unwrap_or(arg.len())
    };
    let path = arg[..end].to_string();
    let mut params = Vec::new();
    for word in arg[end..].split_whitespace() {
        let (k, v) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (word, None),
        };
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return None;
        }
        params.push((k.to_ascii_uppercase(), v));
    }
    Some((path, params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_envelope_commands() {
        assert_eq!(
            parse(b"MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME").unwrap(),
            Command::Mail {
                path: "<a@b.example>".into(),
                params: vec![("SIZE".into(), Some("100".into())), ("BODY".into(), Some("8BITMIME".into()))]
            }
        );
        assert_eq!(
            parse(b"rcpt to: <\"x y>\"@b.example>").unwrap(),
            Command::Rcpt { path: "<\"x y>\"@b.example>".into(), params: vec![] }
        );
        assert_eq!(parse(b"BDAT 100 LAST").unwrap(), Command::Bdat { size: 100, last: true });
        assert!(parse(b"BDAT -1").is_err());
        assert!(parse(b"BDAT 99999999999999999999999").is_err());
        assert_eq!(parse(b"MAIL FROM:<>").unwrap(), Command::Mail { path: "<>".into(), params: vec![] });
        assert!(parse(b"MAIL TO:<a@b>").is_err());
    }

    #[test]
    fn a_character_across_the_keyword_end_is_a_syntax_error() {
        // Found by fuzz/fuzz_targets/smtp_command.rs: slicing panicked here.
        assert_eq!(parse("RCPT TOˮU".as_bytes()), Err(CommandError::Syntax("RCPT TO:<address>")));
        assert_eq!(parse("MAIL FROMé:<a@b>".as_bytes()), Err(CommandError::Syntax("MAIL FROM:<address>")));
    }

    #[test]
    fn refuses_nul_and_bad_utf8() {
        assert_eq!(parse(b"NOOP\0"), Err(CommandError::Nul));
        assert_eq!(parse(b"HELO \xff"), Err(CommandError::NotUtf8));
    }

    proptest! {
        #[test]
        fn never_panics(line in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&line);
        }

        #[test]
        fn mail_roundtrip(local in "[a-z0-9.]{1,20}", domain in "[a-z]{1,10}\\.[a-z]{2,5}") {
            let line = format!("MAIL FROM:<{local}@{domain}>");
            let parsed = parse(line.as_bytes());
            prop_assert_eq!(parsed, Ok(Command::Mail { path: format!("<{local}@{domain}>"), params: vec![] }));
        }
    }
}
