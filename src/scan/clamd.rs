//! ClamAV's clamd over its INSTREAM command (`zINSTREAM\0`, then chunks of
//! a 4-byte big-endian length and the data, then a zero length), on TCP
//! (`host:port`) or a unix socket (`unix:/path`).

use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ScanError;

/// INSTREAM chunk size (clamd's StreamMaxLength caps the whole stream).
const CHUNK: usize = 64 * 1024;
/// Longest reply read from clamd.
const REPLY_LIMIT: u64 = 4096;

/// What clamd said about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdVerdict {
    Clean,
    /// The signature name.
    Virus(String),
}

/// Streams the file at `path` to clamd at `address`.
pub async fn scan(address: &str, path: &Path) -> Result<ClamdVerdict, ScanError> {
    if let Some(socket) = address.strip_prefix("unix:") {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| ScanError::Unreachable(format!("clamd at {address}: {e}")))?;
        instream(stream, path).await
    } else {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| ScanError::Unreachable(format!("clamd at {address}: {e}")))?;
        instream(stream, path).await
    }
}

async fn instream<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, path: &Path) -> Result<ClamdVerdict, ScanError> {
    let io = |e: std::io::Error| ScanError::Protocol(format!("clamd: {e}"));
    let mut file = tokio::fs::File::open(path).await.map_err(|e| ScanError::Local(e.to_string()))?;
    stream.write_all(b"zINSTREAM\0").await.map_err(io)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf).await.map_err(|e| ScanError::Local(e.to_string()))?;
        if n == 0 {
            break;
        }
        stream.write_all(&(n as u32).to_be_bytes()).await.map_err(io)?;
        if let Err(e) = stream.write_all(&buf[..n]).await {
            // clamd closes early when the stream is over its StreamMaxLength;
            // its reply says so.
            let reply = read_reply(&mut stream).await.unwrap_or_default();
            return Err(ScanError::Protocol(format!("clamd: {e} {reply}")));
        }
    }
    stream.write_all(&0u32.to_be_bytes()).await.map_err(io)?;
    let reply = read_reply(&mut stream).await.map_err(io)?;
    parse_reply(&reply)
}

async fn read_reply<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<String> {
    let mut reply = Vec::new();
    stream.take(REPLY_LIMIT).read_to_end(&mut reply).await?;
    Ok(String::from_utf8_lossy(&reply).trim_end_matches(['\0', '\n']).to_string())
}

/// `stream: OK`, `stream: <name> FOUND`, or an error.
pub fn parse_reply(reply: &str) -> Result<ClamdVerdict, ScanError> {
    let text = reply.strip_prefix("stream:").map(str::trim).unwrap_or(reply.trim());
    if text == "OK" {
        Ok(ClamdVerdict::Clean)
    } else if let Some(name) = text.strip_suffix(" FOUND") {
        Ok(ClamdVerdict::Virus(name.trim().to_string()))
    } else {
        Err(ScanError::Protocol(format!("clamd answered {reply:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(parse_reply("stream: OK").unwrap(), ClamdVerdict::Clean);
        assert_eq!(
            parse_reply("stream: Eicar-Test-Signature FOUND").unwrap(),
            ClamdVerdict::Virus("Eicar-Test-Signature".into())
        );
        assert!(parse_reply("INSTREAM size limit exceeded. ERROR").is_err());
        assert!(parse_reply("").is_err());
    }
}
