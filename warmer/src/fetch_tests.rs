//! Sitemaps as real servers send them: chunked, over https from a local rustls server
//! (trusted through a private CA), and the faults: a server whose certificate is not
//! trusted, a 404, a connection that closes mid-body.

use std::sync::Arc;
use std::time::Duration;

use crate::engine::collect_urls_trusting;
use crate::error::WarmError;
use crate::fetch::{FetchError, TlsRoots};
use crate::sitemap::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TIMEOUT: Duration = Duration::from_secs(5);

fn urlset(n: usize) -> String {
    let mut s = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<urlset xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">\n",
    );
    for i in 0..n {
        s.push_str(&format!(
            "<url><loc>http://shop.test/p/{i}.html</loc></url>\n"
        ));
    }
    s + "</urlset>\n"
}

/// `body` as a chunked response, cut into chunks of `chunk` bytes.
fn chunked(body: &str, chunk: usize) -> Vec<u8> {
    let mut out =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for part in body.as_bytes().chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Serves `answer` (raw bytes) to every connection after reading its request head.
async fn serve_raw(answer: Vec<u8>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                read_head(&mut s).await;
                // Written in pieces, as a slow origin would.
                for piece in answer.chunks(100) {
                    if s.write_all(piece).await.is_err() {
                        return;
                    }
                    let _ = s.flush().await;
                }
            });
        }
    });
    addr
}

async fn read_head<S: AsyncReadExt + Unpin>(s: &mut S) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
}

#[tokio::test]
async fn a_chunked_sitemap_is_read() {
    let addr = serve_raw(chunked(&urlset(300), 777)).await;
    let urls = collect_urls_trusting(
        &format!("http://{addr}/sitemap.xml"),
        &Limits::default(),
        TIMEOUT,
        &TlsRoots::system(),
    )
    .await
    .expect("chunked sitemap");
    assert_eq!(urls.len(), 300);
    assert!(urls.contains(&"http://shop.test/p/299.html".to_owned()));
}

#[tokio::test]
async fn a_404_and_a_cut_body_are_clear_errors() {
    let addr =
        serve_raw(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found".to_vec()).await;
    let err = collect_urls_trusting(
        &format!("http://{addr}/sitemap.xml"),
        &Limits::default(),
        TIMEOUT,
        &TlsRoots::system(),
    )
    .await
    .expect_err("404");
    assert!(
        matches!(err, WarmError::Status { status: 404, .. }),
        "{err}"
    );
    // A chunked body that stops before its last chunk.
    let mut cut = chunked(&urlset(50), 500);
    cut.truncate(cut.len() - 40);
    let addr = serve_raw(cut).await;
    let err = collect_urls_trusting(
        &format!("http://{addr}/sitemap.xml"),
        &Limits::default(),
        TIMEOUT,
        &TlsRoots::system(),
    )
    .await
    .expect_err("cut body");
    assert!(matches!(err, WarmError::Fetch { .. }), "{err}");
}

/// A CA, and a certificate for `localhost` it signed.
fn pki() -> (String, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    (ca.pem(), server)
}

/// An https server on localhost answering every request with `body` (chunked).
async fn serve_https(server: rustls::ServerConfig, body: String) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let answer = Arc::new(chunked(&body, 1000));
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (acceptor, answer) = (acceptor.clone(), answer.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                read_head(&mut tls).await;
                let _ = tls.write_all(&answer).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test]
async fn an_https_sitemap_is_read_and_an_untrusted_server_is_refused() {
    let (ca_pem, server) = pki();
    let port = serve_https(server, urlset(120)).await;
    let url = format!("https://localhost:{port}/sitemap.xml");
    let trusted = TlsRoots::from_pem(ca_pem.as_bytes()).expect("roots");
    let urls = collect_urls_trusting(&url, &Limits::default(), TIMEOUT, &trusted)
        .await
        .expect("https sitemap");
    assert_eq!(urls.len(), 120);

    // The same server, not trusted: a TLS error naming the host, no URLs.
    let (other_ca, _) = pki();
    let untrusted = TlsRoots::from_pem(other_ca.as_bytes()).expect("roots");
    let err = collect_urls_trusting(&url, &Limits::default(), TIMEOUT, &untrusted)
        .await
        .expect_err("untrusted");
    assert!(
        matches!(
            &err,
            WarmError::Fetch {
                error: FetchError::Tls { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("localhost"), "{err}");
}
