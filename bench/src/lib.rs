//! Inputs shared by the benchmarks in `benches/` (each bench says what it measures and what
//! number is good in its header comment). Run them with `cargo bench -p ringway-bench`.

/// A request head as a browser sends it: 13 fields, about 600 bytes.
pub const BROWSER_REQUEST: &[u8] = b"GET /static/app.3f9a1c.js?v=2 HTTP/1.1\r\n\
Host: shop.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36\r\n\
Accept: */*\r\n\
Accept-Language: en-US,en;q=0.9,de;q=0.8\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Referer: https://shop.example.com/cart\r\n\
Cookie: session=8f14e45fceea167a5a36dedd4bea2543; theme=dark; _ga=GA1.2.1234567890.1700000000\r\n\
Connection: keep-alive\r\n\
Sec-Fetch-Dest: script\r\n\
Sec-Fetch-Mode: no-cors\r\n\
Sec-Fetch-Site: same-origin\r\n\
If-None-Match: \"3f9a1c-1b2c\"\r\n\
Cache-Control: max-age=0\r\n\r\n";

/// An upstream response head of an app framework.
pub const APP_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
Content-Type: application/javascript; charset=utf-8\r\n\
Content-Length: 48213\r\n\
Cache-Control: public, max-age=31536000, immutable\r\n\
ETag: \"3f9a1c-1b2c\"\r\n\
Last-Modified: Tue, 24 Nov 2026 10:00:00 GMT\r\n\
Vary: Accept-Encoding\r\n\
Date: Wed, 25 Nov 2026 12:00:00 GMT\r\n\
Connection: keep-alive\r\n\r\n";

/// `n` distinct host names: `h{i}.example.test`.
pub fn hosts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("h{i}.example.test")).collect()
}
