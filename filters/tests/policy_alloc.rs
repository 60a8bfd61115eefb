//! The decision core must not allocate per decision. This file is its own test binary with
//! one test, so the counting allocator sees no other test's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use sigil_config::{Policy, SpiffeId};
use sigil_filters::{HttpRequest, PolicyIndex};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decisions_do_not_allocate() {
    let mut yaml = String::new();
    for i in 0..200 {
        yaml += &format!(
            "---\napiVersion: sigil.dev/v1\nkind: Policy\nmetadata: {{name: p{i}, owner: o, purpose: p}}\nspec:\n  target: spiffe://td/ns/prod/sa/me\n  ports:\n    - port: 8080\n      routes:\n        - {{name: r{i}, match: {{methods: [GET], path: {{prefix: /svc{i}}}, headers: [{{name: x-t, value: v}}]}}, allow: [spiffe://td/ns/a/sa/{i}, \"spiffe://td/ns/b/*\"], deny: [spiffe://td/ns/b/sa/bad]}}\n        - {{name: t{i}, match: {{path: {{template: \"/svc{i}/items/{{id}}\"}}}}, allow: [spiffe://td/ns/a/sa/{i}], mode: dry-run}}\n    - port: {p}\n      protocol: tcp\n      rules: [{{name: db{i}, allow: [spiffe://td/ns/a/sa/{i}]}}]\n",
            p = 9000 + i
        );
    }
    let policies = Policy::parse_all(Path::new("gen.yaml"), &yaml).unwrap();
    let idx = PolicyIndex::compile(
        &policies,
        &SpiffeId::parse("spiffe://td/ns/prod/sa/me").unwrap(),
    );
    let peers: Vec<SpiffeId> = [
        "spiffe://td/ns/a/sa/150",
        "spiffe://td/ns/b/sa/x",
        "spiffe://td/ns/b/sa/bad",
        "spiffe://other/x",
    ]
    .iter()
    .map(|s| SpiffeId::parse(s).unwrap())
    .collect();
    let paths = [
        "/svc150/items/7",
        "/svc150",
        "/svc3/x/y/z",
        "/nothing/here",
        "/",
        "/svc199/items/",
    ];
    let header = |name: &str| if name == "x-t" { Some("v") } else { None };

    let mut allowed = 0;
    COUNTING.store(true, Ordering::SeqCst);
    for _ in 0..100 {
        for peer in &peers {
            for path in paths {
                let req = HttpRequest {
                    peer,
                    port: 8080,
                    method: "GET",
                    host: "h",
                    path,
                    header,
                    now: 0,
                };
                let d = idx.decide_http(&req);
                allowed += d.allowed as u32;
                allowed += d.would_deny.is_some() as u32;
            }
            allowed += idx.decide_tcp(peer, 9150, 0).allowed as u32;
        }
    }
    COUNTING.store(false, Ordering::SeqCst);
    let allocs = ALLOCS.load(Ordering::SeqCst);
    // Something was allowed and something denied, so the loop did real work.
    assert!(allowed > 0 && allowed < 100 * 4 * 7, "allowed {allowed}");
    assert_eq!(allocs, 0, "{allocs} allocations in 2,800 decisions");
}
