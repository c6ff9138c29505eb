//! The benchmark's yardstick for "a proxy built on the same libraries as the gateway, doing
//! nothing else": it reads the request, sends it to one upstream over a pooled keep-alive
//! connection, and passes the answer back the way the gateway does (an event stream frame by
//! frame as it arrives, any other answer read whole first). No routing table, auth, parsing,
//! metering, metrics or logs. `bench/run.sh` measures it beside the gateway with
//! `BENCH_REFERENCE_HYPER=1`.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "A bare hyper reverse proxy: the benchmark's yardstick")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Origin every request goes to, such as `http://127.0.0.1:8000`.
    #[arg(long)]
    upstream: String,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Proxy {
    client: HttpClient,
    upstream: String,
}

impl Proxy {
    async fn handle(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Either<Incoming, Full<Bytes>>>, String> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut outgoing = Request::builder()
            .method(parts.method)
            .uri(format!("{}{path}", self.upstream));
        for (name, value) in &parts.headers {
            if name != hyper::header::HOST {
                outgoing = outgoing.header(name, value);
            }
        }
        let outgoing = outgoing.body(Full::new(body)).map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(outgoing)
            .await
            .map_err(|e| e.to_string())?;
        let is_event_stream = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"text/event-stream"));
        let (parts, body) = response.into_parts();
        if is_event_stream {
            return Ok(Response::from_parts(parts, Either::Left(body)));
        }
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Response::from_parts(parts, Either::Right(Full::new(body))))
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let proxy = Arc::new(Proxy {
        client: Client::builder(TokioExecutor::new()).build(connector),
        upstream: args.upstream.trim_end_matches('/').to_owned(),
    });
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("hyper-floor listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let proxy = Arc::clone(&proxy);
                async move { proxy.handle(request).await }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection: {err}");
            }
        });
    }
}
