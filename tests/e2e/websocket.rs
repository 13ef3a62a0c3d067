//! Upgrade to WebSocket through the proxy: a tunnel only after the upstream's 101.

use crate::support::*;
use tungstenite::Message;

#[test]
fn websocket_echo_through_the_proxy() {
    let ws_origin = origin::start_ws_origin();
    let p = TestProxy::start(&routes_to(ws_origin));
    let stream = std::net::TcpStream::connect(p.addr).unwrap();
    let (mut ws, resp) = tungstenite::client::client("ws://app.test/chat", stream).unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::Text("hello".into())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Text("hello".into()));
    let big = vec![7u8; 1 << 20];
    ws.send(Message::Binary(big.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Binary(big));
    for i in 0..100 {
        ws.send(Message::Text(format!("m{i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::Text(format!("m{i}")));
    }
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    assert!(eventually(std::time::Duration::from_secs(3), || p
        .metric_sum("ringway_tunnels_total")
        == 1.0));
}

#[test]
fn upgrade_refused_by_the_upstream_is_a_normal_response() {
    let origin = Origin::start();
    let p = TestProxy::start(&routes_to(origin.addr));
    let mut c = Conn::connect(p.addr);
    c.send(b"GET /headers HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    let rec = origin.requests().pop().unwrap();
    assert_eq!(rec.header("upgrade"), Some("websocket"));
    assert_eq!(rec.header("connection"), Some("upgrade"));
    // No tunnel: the connection goes on as HTTP.
    assert_eq!(c.get("app.test", "/plain").text(), "ok /plain");
}
