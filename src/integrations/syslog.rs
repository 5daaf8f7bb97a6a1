//! Syslog: RFC 5424 messages carrying CEF or LEEF 2.0, over UDP (one datagram each), TCP or TLS
//! (octet-counting framing, RFC 6587 / RFC 5425), every intel value escaped for its format.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::escape::{cap, cef_header, cef_value, leef_header, leef_value};
use super::record::Record;
use super::settings::{SyslogFormat, TargetSettings};
use super::{Failure, Outcome, SendError, Sink};

/// local0.notice.
const PRI: u8 = 16 * 8 + 5;
/// UDP messages stay under rsyslog's default maximum message size (8 KiB).
const MAX_UDP: usize = 8000;

enum Transport {
    Udp,
    Tcp,
    Tls,
}

type Stream = Box<dyn AsyncWrite + Send + Unpin>;

/// A syslog target.
pub struct Syslog {
    transport: Transport,
    host: String,
    port: u16,
    format: SyslogFormat,
    hostname: String,
    timeout: Duration,
    ca_file: Option<String>,
    stream: Option<Stream>,
    udp: Option<tokio::net::UdpSocket>,
}

impl Syslog {
    /// From settings.
    pub fn new(t: &TargetSettings) -> Result<Self, String> {
        let url = url::Url::parse(&t.url).map_err(|e| format!("{}: {e}", t.url))?;
        let transport = match url.scheme() {
            "udp" => Transport::Udp,
            "tcp" => Transport::Tcp,
            _ => Transport::Tls,
        };
        let hostname: String = crate::lake::lock::host()
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(255)
            .collect();
        Ok(Self {
            transport,
            host: url
                .host_str()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_string(),
            port: url.port().unwrap_or(514),
            format: t.format.unwrap_or_default(),
            hostname: if hostname.is_empty() {
                "-".into()
            } else {
                hostname
            },
            timeout: Duration::from_secs_f64(t.timeout_secs.max(1.0)),
            ca_file: t.ca_file.clone(),
            stream: None,
            udp: None,
        })
    }

    /// The RFC 5424 message of a record.
    pub fn message(&self, r: &Record) -> String {
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let body = match self.format {
            SyslogFormat::Cef => cef(r),
            SyslogFormat::Leef => leef(r),
        };
        format!(
            "<{PRI}>1 {ts} {} threatlake - mapping - {body}",
            self.hostname
        )
    }

    fn where_(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    async fn connect(&mut self) -> Result<(), SendError> {
        let addr = self.where_();
        let fail = |e: String| SendError {
            message: format!("syslog {addr}: {e}"),
            failure: Failure::Transient(None),
        };
        match self.transport {
            Transport::Udp if self.udp.is_none() => {
                let bind = if self.host.contains(':') {
                    "[::]:0"
                } else {
                    "0.0.0.0:0"
                };
                let s = tokio::net::UdpSocket::bind(bind)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                s.connect((self.host.as_str(), self.port))
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                self.udp = Some(s);
            }
            Transport::Tcp | Transport::Tls if self.stream.is_none() => {
                let tcp = tokio::time::timeout(
                    self.timeout,
                    tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
                )
                .await
                .map_err(|_| fail("connection timed out".into()))?
                .map_err(|e| fail(format!("could not connect: {e}")))?;
                let _ = tcp.set_nodelay(true);
                self.stream = Some(match self.transport {
                    Transport::Tls => {
                        let config =
                            tls_config(self.ca_file.as_deref()).map_err(|e| SendError {
                                message: format!("syslog {addr}: {e}"),
                                failure: Failure::Stop,
                            })?;
                        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                            .map_err(|e| fail(format!("server name: {e}")))?;
                        let tls = tokio::time::timeout(
                            self.timeout,
                            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
                        )
                        .await
                        .map_err(|_| fail("TLS handshake timed out".into()))?
                        .map_err(|e| fail(format!("TLS handshake: {e}")))?;
                        Box::new(tls)
                    }
                    _ => Box::new(tcp),
                });
            }
            _ => {}
        }
        Ok(())
    }

    async fn write_all(&mut self, frames: &[u8]) -> Result<(), std::io::Error> {
        let Some(s) = self.stream.as_mut() else {
            return Err(std::io::ErrorKind::NotConnected.into());
        };
        tokio::time::timeout(self.timeout, async {
            s.write_all(frames).await?;
            s.flush().await
        })
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }
}

fn tls_config(ca_file: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("ca_file {path}: {e}"))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("ca_file {path}: {e}"))?;
        for c in certs {
            roots.add(c).map_err(|e| format!("ca_file {path}: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// CEF:0 with the technique as signature id, severity 0-10 from the score.
pub fn cef(r: &Record) -> String {
    let sev = (r.score * 10.0).round().clamp(0.0, 10.0) as u8;
    let tactics: Vec<&str> = r.tactics.iter().map(|t| t.shortname.as_str()).collect();
    let observables: Vec<String> = r
        .observables
        .iter()
        .map(|o| format!("{}:{}", o.kind, o.value))
        .collect();
    let mut ext = vec![
        ("rt", millis(&r.mapped_at)),
        ("externalId", r.delivery_id.clone()),
        ("cat", tactics.join(",")),
        ("msg", cap(r.title.as_deref().unwrap_or(&r.item_id), 1000)),
        ("cs1Label", "item_id".into()),
        ("cs1", cap(&r.item_id, 500)),
        ("cs2Label", "source".into()),
        ("cs2", r.source.clone()),
        ("cs3Label", "method".into()),
        ("cs3", r.method.clone()),
        ("cs4Label", "tactic_ids".into()),
        (
            "cs4",
            r.tactics
                .iter()
                .filter_map(|t| t.id.clone())
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("cs5Label", "observables".into()),
        ("cs5", cap(&observables.join(" "), 2000)),
        ("cs6Label", "model_version".into()),
        ("cs6", r.model_version.clone().unwrap_or_default()),
        ("cfp1Label", "score".into()),
        ("cfp1", format!("{:.4}", r.score)),
    ];
    if let Some(u) = r.observables.iter().find(|o| o.kind == "url") {
        ext.push(("request", cap(&u.value, 1000)));
    }
    let ext: Vec<String> = ext
        .into_iter()
        .map(|(k, v)| format!("{k}={}", cef_value(&v)))
        .collect();
    format!(
        "CEF:0|threatlake|threatlake|{}|{}|{}|{sev}|{}",
        env!("CARGO_PKG_VERSION"),
        cef_header(&cap(&r.technique_id, 100)),
        cef_header(&cap(
            r.technique_name.as_deref().unwrap_or(&r.technique_id),
            512
        )),
        ext.join(" ")
    )
}

/// LEEF:2.0 with tab-separated attributes.
pub fn leef(r: &Record) -> String {
    let observables: Vec<String> = r
        .observables
        .iter()
        .map(|o| format!("{}:{}", o.kind, o.value))
        .collect();
    let attrs = [
        ("devTime", millis(&r.mapped_at)),
        (
            "sev",
            ((r.score * 10.0).round().clamp(0.0, 10.0) as u8).to_string(),
        ),
        (
            "cat",
            r.tactics
                .iter()
                .map(|t| t.shortname.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("externalId", r.delivery_id.clone()),
        ("techniqueId", cap(&r.technique_id, 100)),
        (
            "techniqueName",
            cap(r.technique_name.as_deref().unwrap_or(""), 512),
        ),
        ("itemId", cap(&r.item_id, 500)),
        ("source", r.source.clone()),
        ("method", r.method.clone()),
        ("score", format!("{:.4}", r.score)),
        ("msg", cap(r.title.as_deref().unwrap_or(&r.item_id), 1000)),
        ("observables", cap(&observables.join(" "), 2000)),
    ];
    let attrs: Vec<String> = attrs
        .into_iter()
        .map(|(k, v)| format!("{k}={}", leef_value(&v)))
        .collect();
    format!(
        "LEEF:2.0|threatlake|threatlake|{}|{}|x09|{}",
        env!("CARGO_PKG_VERSION"),
        leef_header(&cap(&r.technique_id, 100)),
        attrs.join("\t")
    )
}

fn millis(rfc3339: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|d| d.timestamp_millis().to_string())
        .unwrap_or_default()
}

#[async_trait]
impl Sink for Syslog {
    async fn send(&mut self, batch: &[Record]) -> Result<Vec<Outcome>, SendError> {
        self.connect().await?;
        let addr = self.where_();
        if let Some(udp) = &self.udp {
            for r in batch {
                let m = cap(&self.message(r), MAX_UDP);
                udp.send(m.as_bytes()).await.map_err(|e| SendError {
                    message: format!("syslog udp {addr}: {e}"),
                    failure: Failure::Transient(None),
                })?;
            }
            return Ok(vec![Outcome::Delivered; batch.len()]);
        }
        let mut frames = Vec::with_capacity(batch.len() * 512);
        for r in batch {
            let m = self.message(r);
            frames.extend_from_slice(format!("{} ", m.len()).as_bytes());
            frames.extend_from_slice(m.as_bytes());
        }
        if let Err(e) = self.write_all(&frames).await {
            // The receiver may have closed an idle connection: reconnect once and resend.
            self.stream = None;
            self.connect().await?;
            self.write_all(&frames).await.map_err(|e2| {
                self.stream = None;
                SendError {
                    message: format!("syslog {addr}: write failed: {e}; after reconnecting: {e2}"),
                    failure: Failure::Transient(None),
                }
            })?;
        }
        Ok(vec![Outcome::Delivered; batch.len()])
    }
}
