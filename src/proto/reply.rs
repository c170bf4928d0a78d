//! SMTP replies: a code, an enhanced status code (RFC 3463) on every reply,
//! and text; rendered as one or more `code[-| ]enh text` lines.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: &'static str,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<String>) -> Reply {
        Reply { code, enhanced, lines: vec![text.into()] }
    }

    pub fn multi(code: u16, enhanced: &'static str, lines: Vec<String>) -> Reply {
        Reply { code, enhanced, lines }
    }

    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    pub fn is_temporary(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            let sep = if i + 1 == n { ' ' } else { '-' };
            // RFC 2034: the greeting and EHLO keyword lines carry no status code.
            if self.enhanced.is_empty() {
                out.push_str(&format!("{}{}{}\r\n", self.code, sep, text));
            } else {
                out.push_str(&format!("{}{}{} {}\r\n", self.code, sep, self.enhanced, text));
            }
        }
        out
    }

    // The replies used in more than one place.
    pub fn ok() -> Reply {
        Reply::new(250, "2.0.0", "Ok")
    }
    pub fn bad_sequence(text: &str) -> Reply {
        Reply::new(503, "5.5.1", format!("Error: {text}"))
    }
    pub fn syntax(text: &str) -> Reply {
        Reply::new(501, "5.5.4", format!("Syntax: {text}"))
    }
    pub fn temp_lookup_failure(what: &str) -> Reply {
        Reply::new(451, "4.3.0", format!("{what}: Temporary lookup failure"))
    }
    pub fn queue_unavailable() -> Reply {
        Reply::new(451, "4.3.0", "Error: queue file write error, try again later")
    }
    pub fn too_big() -> Reply {
        Reply::new(552, "5.3.4", "Error: message file too big")
    }
    pub fn bare_newline() -> Reply {
        Reply::new(554, "5.6.0", "Error: bare <CR> or <LF> received (message refused, see RFC 5321 section 2.3.8)")
    }
    pub fn timeout(host: &str) -> Reply {
        Reply::new(421, "4.4.2", format!("{host} Error: timeout exceeded"))
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.render();
        f.write_str(r.trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_single_and_multi_line() {
        assert_eq!(Reply::ok().render(), "250 2.0.0 Ok\r\n");
        let r = Reply::multi(250, "", vec!["mx.example".into(), "PIPELINING".into()]);
        assert_eq!(r.render(), "250-mx.example\r\n250 PIPELINING\r\n");
    }
}
