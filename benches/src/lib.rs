//! Trailmark's benchmarks: criterion micro-benchmarks of the hot paths and the
//! end-to-end load generator.
//!
//! # Layout
//! - `benches/ingest_parse.rs`: parse, validate and normalise Segment bodies.
//! - `benches/avro_codec.rs`: the log record codec.
//! - `benches/fold.rs`: projecting events and folding them into profiles.
//! - `src/bin/loadgen.rs`: drives a running server over HTTP (`ingest`,
//!   `visibility`, `lookup`).
//! - This library: the fixtures they share, so that the micro-benchmarks and
//!   the load generator measure the same bodies. A "realistic" event is what
//!   analytics.js or analytics-node sends: about 600 bytes of JSON with a
//!   nested `properties` and a `context` holding library, page, user agent and
//!   locale.
//!
//! Fixtures are deterministic given a seed ([`Rng`]), so runs compare; the
//! load generator passes fresh `messageId`s so the server never de-duplicates
//! them.
//!
//! Results and how to reproduce them are in `benches/RESULTS.md`.

use std::fmt::Write as _;

use trailmark_domain::parse::{RequestMeta, parse_batch, parse_single};
use trailmark_domain::{Event, EventType, Limits};

/// A small, fast, deterministic generator (SplitMix64). The benchmarks need
/// reproducible variety, not cryptographic randomness.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift: unbiased enough for fixtures, and no division.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A pool of `n` people: user `i` always has the same `userId` and
/// `anonymousId`, so separate runs (an `ingest` run, then a `lookup` run) agree
/// on who exists.
#[derive(Debug, Clone, Copy)]
pub struct UserPool {
    n: u64,
}

impl UserPool {
    /// A pool of `n` people (at least one).
    pub fn new(n: u64) -> Self {
        Self { n: n.max(1) }
    }

    /// How many people the pool holds.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Whether the pool is empty (never: it holds at least one person).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `userId` of person `i`.
    pub fn user_id(&self, i: u64) -> String {
        format!("user-{:08}", i % self.n)
    }

    /// The `anonymousId` of person `i`, shaped like analytics.js's UUIDs.
    pub fn anonymous_id(&self, i: u64) -> String {
        let h = Rng::new(i % self.n).next_u64();
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            h >> 32,
            (h >> 16) & 0xffff,
            h & 0xfff,
            (h >> 20) & 0xfff,
            h.rotate_left(17) & 0xffff_ffff_ffff
        )
    }

    /// A random person.
    pub fn any(&self, rng: &mut Rng) -> u64 {
        rng.below(self.n)
    }
}

/// Event names with the lengths real tracking plans use.
const EVENT_NAMES: [&str; 6] = [
    "Order Completed",
    "Product Viewed",
    "Product Added",
    "Checkout Started",
    "Signed Up",
    "Subscription Renewed",
];

const PAGES: [(&str, &str); 4] = [
    ("Pricing", "/pricing"),
    ("Home", "/"),
    ("Checkout", "/checkout"),
    ("Docs", "/docs/getting-started"),
];

const PLANS: [&str; 3] = ["free", "pro", "enterprise"];

/// A fixed event time for the micro-benchmarks: 2024-05-01T12:30:45.123Z.
pub const FIXED_TIME: &str = "2024-05-01T12:30:45.123Z";

/// What varies between generated events.
#[derive(Debug, Clone, Copy)]
pub struct EventParams<'a> {
    /// The person, from a [`UserPool`].
    pub user: u64,
    /// The `messageId`.
    pub message_id: &'a str,
    /// The client time of the call (`originalTimestamp`), RFC 3339.
    pub time: &'a str,
}

fn context(out: &mut String, p: &EventParams<'_>, path: &str) {
    let _ = write!(
        out,
        r#""context":{{"library":{{"name":"analytics.js","version":"2.11.1"}},"page":{{"path":"{path}","url":"https://shop.example.com{path}"}},"userAgent":"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36","ip":"203.0.113.{}"}}"#,
        1 + p.user % 250
    );
}

/// A `track` call of about 600 bytes (see `tests::track_is_about_600_bytes`),
/// as one JSON object without a trailing newline.
pub fn track_json(pool: &UserPool, p: &EventParams<'_>, rng: &mut Rng) -> String {
    let mut s = String::with_capacity(640);
    let event = rng.pick(&EVENT_NAMES);
    let price = 5 + rng.below(195);
    let qty = 1 + rng.below(4);
    let _ = write!(
        s,
        r#"{{"type":"track","event":"{event}","userId":"{}","anonymousId":"{}","messageId":"{}","originalTimestamp":"{}","properties":{{"order_id":"ord_{:010}","total":{}.{:02},"products":[{{"sku":"SKU-{:05}","price":{price},"quantity":{qty}}}]}},"#,
        pool.user_id(p.user),
        pool.anonymous_id(p.user),
        p.message_id,
        p.time,
        rng.below(10_000_000_000),
        price * qty,
        rng.below(100),
        rng.below(100_000),
    );
    context(&mut s, p, rng.pick(&PAGES).1);
    s.push('}');
    s
}

/// An `identify` call with a handful of traits, about the same size.
pub fn identify_json(pool: &UserPool, p: &EventParams<'_>, rng: &mut Rng) -> String {
    let mut s = String::with_capacity(640);
    let user = pool.user_id(p.user);
    let _ = write!(
        s,
        r#"{{"type":"identify","userId":"{user}","anonymousId":"{}","messageId":"{}","originalTimestamp":"{}","traits":{{"email":"{user}@example.com","name":"Person {}","plan":"{}","company":{{"name":"Initech","employees":329}}}},"#,
        pool.anonymous_id(p.user),
        p.message_id,
        p.time,
        p.user,
        rng.pick(&PLANS),
    );
    context(&mut s, p, PAGES[0].1);
    s.push('}');
    s
}

/// A `page` call, about the same size.
pub fn page_json(pool: &UserPool, p: &EventParams<'_>, rng: &mut Rng) -> String {
    let mut s = String::with_capacity(640);
    let page = *rng.pick(&PAGES);
    let _ = write!(
        s,
        r#"{{"type":"page","name":"{}","category":"Web","userId":"{}","anonymousId":"{}","messageId":"{}","originalTimestamp":"{}","properties":{{"title":"{}","path":"{}","search":"?utm_source=newsletter"}},"#,
        page.0,
        pool.user_id(p.user),
        pool.anonymous_id(p.user),
        p.message_id,
        p.time,
        page.0,
        page.1,
    );
    context(&mut s, p, page.1);
    s.push('}');
    s
}

/// A mixed call, in the proportions a web source sends: mostly `track`, then
/// `page`, a few `identify`.
pub fn mixed_json(pool: &UserPool, p: &EventParams<'_>, rng: &mut Rng) -> String {
    match rng.below(10) {
        0 => identify_json(pool, p, rng),
        1..=3 => page_json(pool, p, rng),
        _ => track_json(pool, p, rng),
    }
}

/// Which calls a load sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// [`mixed_json`]: what a web source sends, every call with both a
    /// `userId` and an `anonymousId`.
    Web,
    /// Only `track` calls naming one identifier (`userId`): no identity
    /// evidence at all, the baseline of the identity-cost benchmark.
    TrackOnly,
    /// 90% of those tracks, 5% `identify` (a new device's `anonymousId`, the
    /// `userId` and an email) and 5% `alias` (a new former id): identity
    /// work that always adds evidence.
    Identity,
}

/// One call of `mix`.
pub fn call_json(mix: Mix, pool: &UserPool, p: &EventParams<'_>, rng: &mut Rng) -> String {
    match mix {
        Mix::Web => mixed_json(pool, p, rng),
        Mix::TrackOnly => user_track_json(pool, p, rng),
        Mix::Identity => match rng.below(20) {
            0 => {
                // A new device of the person: fresh evidence every time.
                let mut s = identify_json(pool, p, rng);
                let device = format!("dev-{}", p.message_id);
                s = s.replacen(&pool.anonymous_id(p.user), &device, 1);
                s
            }
            1 => format!(
                r#"{{"type":"alias","userId":"{}","previousId":"old-{}","messageId":"{}","originalTimestamp":"{}"}}"#,
                pool.user_id(p.user),
                p.message_id,
                p.message_id,
                p.time
            ),
            _ => user_track_json(pool, p, rng),
        },
    }
}

/// A `track` call naming only its `userId`.
fn user_track_json(pool: &UserPool, p: &EventParams<'_>, rng: &mut Rng) -> String {
    let anon = format!(r#","anonymousId":"{}""#, pool.anonymous_id(p.user));
    track_json(pool, p, rng).replacen(&anon, "", 1)
}

/// A `/v1/batch` body `{"batch":[...],"sentAt":...}` from item JSON texts.
pub fn batch_body<S: AsRef<str>>(items: &[S], sent_at: &str) -> String {
    let len: usize = items.iter().map(|i| i.as_ref().len() + 1).sum();
    let mut s = String::with_capacity(len + 64);
    s.push_str(r#"{"batch":["#);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(item.as_ref());
    }
    let _ = write!(s, r#"],"sentAt":"{sent_at}"}}"#);
    s
}

/// The request metadata the micro-benchmarks normalise with.
pub fn bench_meta() -> RequestMeta<'static> {
    RequestMeta {
        workspace_id: "ws_bench",
        source_id: "src_bench",
        received_at: 1_714_566_646_000_000,
        request_ip: Some("203.0.113.7"),
    }
}

/// One realistic `track` call as bytes, for the single-event benchmarks.
pub fn sample_track_body() -> Vec<u8> {
    let pool = UserPool::new(1_000);
    let mut rng = Rng::new(7);
    track_json(
        &pool,
        &EventParams {
            user: 42,
            message_id: "ajs-6c0f5b1e-1a2b-4c3d-9e8f-0123456789ab",
            time: FIXED_TIME,
        },
        &mut rng,
    )
    .into_bytes()
}

/// A `/v1/batch` body of `n` mixed calls over `users` people.
pub fn sample_batch_body(n: usize, users: u64, seed: u64) -> Vec<u8> {
    let pool = UserPool::new(users);
    let mut rng = Rng::new(seed);
    let items: Vec<String> = (0..n)
        .map(|i| {
            let user = pool.any(&mut rng);
            let id = format!("bench-{seed}-{i}");
            mixed_json(
                &pool,
                &EventParams {
                    user,
                    message_id: &id,
                    time: FIXED_TIME,
                },
                &mut rng,
            )
        })
        .collect();
    batch_body(&items, "2024-05-01T12:30:46.000Z").into_bytes()
}

/// The normalised [`Event`] of [`sample_track_body`], through the real parser.
pub fn sample_track_event() -> Event {
    let body = sample_track_body();
    parse_single(&body, &Limits::default())
        .and_then(|raw| raw.normalise(EventType::Track, &bench_meta(), &mut unreachable_id))
        .expect("the sample track event is valid")
}

fn unreachable_id() -> String {
    // Fixtures carry their own messageIds; one generated here would be a bug in them.
    String::from("generated")
}

/// A stream of `n` normalised events over `users` people, through the real
/// parser: mostly anonymous browsing, with identify calls that link each
/// person's `anonymousId`, `userId` and email, and some aliases, so the fold
/// does real identity merges. Event times move forward with jitter, so trait
/// conflicts are decided by time.
pub fn event_stream(n: usize, users: u64, seed: u64) -> Vec<Event> {
    let pool = UserPool::new(users);
    let mut rng = Rng::new(seed);
    let limits = Limits::default();
    let base = chrono::DateTime::parse_from_rfc3339(FIXED_TIME).expect("fixed time parses");
    (0..n)
        .map(|i| {
            let user = pool.any(&mut rng);
            let id = format!("stream-{seed}-{i}");
            let at = base + chrono::Duration::milliseconds(i as i64 * 10 + rng.below(5_000) as i64);
            let time = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let p = EventParams {
                user,
                message_id: &id,
                time: &time,
            };
            let (kind, json) = match rng.below(20) {
                0..=1 => (EventType::Identify, identify_json(&pool, &p, &mut rng)),
                2 => {
                    let json = format!(
                        r#"{{"userId":"{}","previousId":"{}","messageId":"{id}","originalTimestamp":"{time}"}}"#,
                        pool.user_id(user),
                        pool.anonymous_id(user)
                    );
                    (EventType::Alias, json)
                }
                3..=7 => (EventType::Page, page_json(&pool, &p, &mut rng)),
                _ => {
                    // Anonymous browsing: drop the userId, as before a login.
                    let json = track_json(&pool, &p, &mut rng);
                    let json = if rng.below(2) == 0 {
                        json.replacen(&format!(r#""userId":"{}","#, pool.user_id(user)), "", 1)
                    } else {
                        json
                    };
                    (EventType::Track, json)
                }
            };
            let mut meta = bench_meta();
            meta.received_at = at.timestamp_micros() + 50_000;
            parse_single(json.as_bytes(), &limits)
                .and_then(|raw| raw.normalise(kind, &meta, &mut unreachable_id))
                .expect("generated events are valid")
        })
        .collect()
}

/// Checks that `body` is a batch the parser accepts whole; fixtures call it in tests.
pub fn batch_is_valid(body: &[u8]) -> bool {
    parse_batch(body, &Limits::default())
        .map(|raw| raw.normalise(&bench_meta(), &Limits::default(), &mut unreachable_id))
        .is_ok_and(|parsed| parsed.rejected.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_is_about_600_bytes() {
        let pool = UserPool::new(100_000);
        let mut rng = Rng::new(1);
        for i in 0..200 {
            let id = uuid::Uuid::new_v4().to_string();
            let p = EventParams {
                user: pool.any(&mut rng),
                message_id: &id,
                time: FIXED_TIME,
            };
            for (kind, json) in [
                ("track", track_json(&pool, &p, &mut rng)),
                ("identify", identify_json(&pool, &p, &mut rng)),
                ("page", page_json(&pool, &p, &mut rng)),
            ] {
                let v: serde_json::Value = serde_json::from_str(&json).expect("valid json");
                assert_eq!(v["type"], kind, "{i}");
                assert!(
                    (520..=700).contains(&json.len()),
                    "{kind} is {} bytes",
                    json.len()
                );
            }
        }
        let single = sample_track_body();
        assert!(
            (560..=640).contains(&single.len()),
            "sample is {} bytes",
            single.len()
        );
    }

    #[test]
    fn pool_ids_are_stable_and_distinct() {
        let pool = UserPool::new(1_000);
        assert_eq!(pool.user_id(5), "user-00000005");
        assert_eq!(pool.anonymous_id(5), pool.anonymous_id(1_005));
        let anon: std::collections::BTreeSet<String> =
            (0..1_000).map(|i| pool.anonymous_id(i)).collect();
        assert_eq!(anon.len(), 1_000);
    }

    #[test]
    fn fixtures_pass_the_parser() {
        let body = sample_batch_body(100, 50, 3);
        assert!(batch_is_valid(&body));
        assert!(!batch_is_valid(br#"{"batch":[{"type":"track"}]}"#));
        let ev = sample_track_event();
        assert_eq!(ev.kind, EventType::Track);
        assert!(ev.context.is_some() && ev.properties.is_some());
        let stream = event_stream(500, 20, 9);
        assert_eq!(stream.len(), 500);
        assert!(stream.iter().any(|e| e.kind == EventType::Alias));
        assert!(stream.iter().any(|e| e.user_id.is_none()));
    }

    #[test]
    fn rng_is_deterministic_and_bounded() {
        let a: Vec<u64> = {
            let mut r = Rng::new(11);
            (0..100).map(|_| r.below(7)).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(11);
            (0..100).map(|_| r.below(7)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().all(|&x| x < 7));
        assert!((0..7).all(|x| a.contains(&x)));
    }
}
