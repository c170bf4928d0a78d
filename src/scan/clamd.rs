//! ClamAV's clamd over its INSTREAM command (`zINSTREAM\0`, then chunks of
//! a 4-byte big-endian length and the data, then a zero length), on TCP
//! (`host:port`) or a unix socket (`unix:/path`).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Content, ScanError};

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

/// Streams the message to clamd at `address`.
pub async fn scan(address: &str, content: &Content) -> Result<ClamdVerdict, ScanError> {
    if let Some(socket) = address.strip_prefix("unix:") {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| ScanError::Unreachable(format!("clamd at {address}: {e}")))?;
        instream(stream, content).await
    } else {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| ScanError::Unreachable(format!("clamd at {address}: {e}")))?;
        instream(stream, content).await
    }
}

async fn instream<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    content: &Content,
) -> Result<ClamdVerdict, ScanError> {
    let io = |e: std::io::Error| ScanError::Protocol(format!("clamd: {e}"));
    stream.write_all(b"zINSTREAM\0").await.map_err(io)?;
    match content {
        Content::Memory(bytes) => {
            for piece in bytes.chunks(CHUNK) {
                send_piece(&mut stream, piece).await?;
            }
        }
        Content::File(path) => {
            let mut file = tokio::fs::File::open(path).await.map_err(|e| ScanError::Local(e.to_string()))?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = file.read(&mut buf).await.map_err(|e| ScanError::Local(e.to_string()))?;
                if n == 0 {
                    break;
                }
                send_piece(&mut stream, &buf[..n]).await?;
            }
        }
    }
    stream.write_all(&0u32.to_be_bytes()).await.map_err(io)?;
    let reply = read_reply(&mut stream).await.map_err(io)?;
    parse_reply(&reply)
}

/// One INSTREAM chunk: its length, then the bytes.
async fn send_piece<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, piece: &[u8]) -> Result<(), ScanError> {
    let io = |e: std::io::Error| ScanError::Protocol(format!("clamd: {e}"));
    stream.write_all(&(piece.len() as u32).to_be_bytes()).await.map_err(io)?;
    if let Err(e) = stream.write_all(piece).await {
        // clamd closes early when the stream is over its StreamMaxLength;
        // its reply says so.
        let reply = read_reply(stream).await.unwrap_or_default();
        return Err(ScanError::Protocol(format!("clamd: {e} {reply}")));
    }
    Ok(())
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
