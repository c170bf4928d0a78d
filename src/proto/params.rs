//! The ESMTP parameters of MAIL and RCPT (RFC 1869) we take: `SIZE`,
//! `BODY`, `SMTPUTF8`, `AUTH` and the DSN ones ([`super::dsn`]). Pure:
//! the parsed keyword/value pairs in, what they ask for or the one reply
//! that refuses them out.
//!
//! Invariant: after HELO (not ESMTP) no parameter is taken; an unknown one
//! is `555 5.5.4`, a known one with a bad value `501 5.5.4`.

use crate::proto::dsn;
use crate::proto::reply::Reply;

/// What the MAIL parameters ask for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MailParams {
    pub smtputf8: bool,
    pub eight_bit: bool,
    /// RFC 3461 `RET`, in upper case.
    pub dsn_ret: Option<String>,
    /// RFC 3461 `ENVID`, still xtext.
    pub dsn_envid: Option<String>,
}

/// What the RCPT parameters ask for (RFC 3461).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RcptParams {
    /// `NOTIFY`, normalised by [`dsn::parse_notify`].
    pub notify: Option<String>,
    /// `ORCPT` as sent (its address still xtext).
    pub orcpt: Option<String>,
}

/// Checks MAIL's parameters against `size_limit` (`message_size_limit`).
/// `Err` is the reply, and whether it is a policy refusal to log as
/// `NOQUEUE`.
pub fn mail_params(
    params: &[(String, Option<String>)],
    esmtp: bool,
    size_limit: u64,
) -> Result<MailParams, (Reply, bool)> {
    let mut asked = MailParams::default();
    for (key, value) in params {
        match (key.as_str(), value.as_deref()) {
            ("SIZE", Some(v)) if esmtp => match v.parse::<u64>() {
                Ok(n) if n > size_limit => {
                    return Err((Reply::new(552, "5.3.4", "Message size exceeds fixed limit"), true));
                }
                Ok(_) => {}
                Err(_) => return Err((Reply::new(501, "5.5.4", "Bad message size syntax"), false)),
            },
            ("BODY", Some(v)) if esmtp && v.eq_ignore_ascii_case("8BITMIME") => asked.eight_bit = true,
            ("BODY", Some(v)) if esmtp && v.eq_ignore_ascii_case("7BIT") => {}
            ("SMTPUTF8", None) if esmtp => asked.smtputf8 = true,
            // RFC 4954 §5: the original submitter; accepted, not trusted.
            ("AUTH", Some(_)) if esmtp => {}
            ("RET", Some(v)) if esmtp => match dsn::parse_ret(v) {
                Some(ret) => asked.dsn_ret = Some(ret.to_string()),
                None => return Err((Reply::new(501, "5.5.4", "Bad RET parameter syntax"), false)),
            },
            ("ENVID", Some(v)) if esmtp => match dsn::parse_envid(v) {
                Some(envid) => asked.dsn_envid = Some(envid),
                None => return Err((Reply::new(501, "5.5.4", "Bad ENVID parameter syntax"), false)),
            },
            _ => return Err((Reply::new(555, "5.5.4", format!("Unsupported option: {key}")), false)),
        }
    }
    Ok(asked)
}

/// Checks RCPT's parameters: RFC 3461 `NOTIFY` and `ORCPT`.
pub fn rcpt_params(params: &[(String, Option<String>)], esmtp: bool) -> Result<RcptParams, Reply> {
    let mut asked = RcptParams::default();
    for (key, value) in params {
        match (key.as_str(), value.as_deref()) {
            ("NOTIFY", Some(v)) if esmtp => {
                asked.notify =
                    Some(dsn::parse_notify(v).ok_or_else(|| Reply::new(501, "5.5.4", "Bad NOTIFY parameter syntax"))?)
            }
            ("ORCPT", Some(v)) if esmtp => {
                asked.orcpt =
                    Some(dsn::parse_orcpt(v).ok_or_else(|| Reply::new(501, "5.5.4", "Bad ORCPT parameter syntax"))?)
            }
            _ => return Err(Reply::new(555, "5.5.4", format!("Unsupported option: {key}"))),
        }
    }
    Ok(asked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(list: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        list.iter().map(|(k, v)| (k.to_string(), v.map(String::from))).collect()
    }

    #[test]
    fn mail_parameters_need_ehlo_and_size_is_checked_against_the_limit() {
        let asked = mail_params(&params(&[("BODY", Some("8bitmime")), ("SMTPUTF8", None)]), true, 10).unwrap();
        assert_eq!(asked, MailParams { smtputf8: true, eight_bit: true, ..Default::default() });
        assert_eq!(
            mail_params(&params(&[("SIZE", Some("10")), ("AUTH", Some("<>"))]), true, 10),
            Ok(MailParams::default())
        );
        let (reply, refusal) = mail_params(&params(&[("SIZE", Some("11"))]), true, 10).unwrap_err();
        assert_eq!((reply.code, reply.enhanced, refusal), (552, "5.3.4", true));
        let (reply, refusal) = mail_params(&params(&[("SIZE", Some("x"))]), true, 10).unwrap_err();
        assert_eq!((reply.code, refusal), (501, false));
        // After HELO, no parameter is known.
        let (reply, _) = mail_params(&params(&[("BODY", Some("8BITMIME"))]), false, 10).unwrap_err();
        assert_eq!(reply.to_string(), "555 5.5.4 Unsupported option: BODY");
    }

    #[test]
    fn dsn_parameters_are_validated_and_kept() {
        let dsn = mail_params(&params(&[("RET", Some("hdrs")), ("ENVID", Some("QQ+2B1"))]), true, 10).unwrap();
        assert_eq!((dsn.dsn_ret.as_deref(), dsn.dsn_envid.as_deref()), (Some("HDRS"), Some("QQ+2B1")));
        assert_eq!(mail_params(&params(&[("RET", Some("SOME"))]), true, 10).unwrap_err().0.code, 501);
        assert_eq!(mail_params(&params(&[("ENVID", Some("a=b"))]), true, 10).unwrap_err().0.code, 501);
        assert_eq!(mail_params(&params(&[("RET", Some("HDRS"))]), false, 10).unwrap_err().0.code, 555, "after HELO");
        assert_eq!(
            rcpt_params(&params(&[("NOTIFY", Some("delay,failure"))]), true).unwrap().notify.as_deref(),
            Some("FAILURE,DELAY")
        );
        assert_eq!(rcpt_params(&params(&[("NOTIFY", Some("NEVER,DELAY"))]), true).unwrap_err().code, 501);
        assert_eq!(
            rcpt_params(&params(&[("ORCPT", Some("rfc822;a+40b"))]), true).unwrap().orcpt.as_deref(),
            Some("rfc822;a+40b")
        );
        assert_eq!(rcpt_params(&params(&[("XYZ", None)]), true).unwrap_err().code, 555);
        assert_eq!(rcpt_params(&params(&[("NOTIFY", Some("NEVER"))]), false).unwrap_err().code, 555, "after HELO");
    }
}
