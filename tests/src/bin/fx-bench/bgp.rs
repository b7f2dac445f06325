//! Section 6, routing half: BIRD announces N /24s to a node's agent (one eBGP session); the
//! time from `birdc configure` until the node reports all N kernel routes programmed, and from
//! the configuration without them until none is left (`ferrox_tests::harness::bird`).

use ferrox_tests::harness::bird;
use serde_json::{Value, json};

pub fn learning(sizes: &[u32]) -> Vec<Value> {
    let mut rows = Vec::new();
    for &n in sizes {
        let c = bird::learning_cluster();
        let l = bird::learn_and_forget(&c, c.node(1), n);
        eprintln!(
            "BGP {n:>7} routes: programmed {:.2} s after birdc configure ({:.2} s BIRD reading it), withdrawn {:.2} s",
            l.learned.as_secs_f64(),
            l.bird_configure.as_secs_f64(),
            l.withdrawn.as_secs_f64()
        );
        rows.push(json!({
            "routes": n,
            "learned_s": l.learned.as_secs_f64(),
            "bird_configure_s": l.bird_configure.as_secs_f64(),
            "withdrawn_s": l.withdrawn.as_secs_f64(),
        }));
    }
    rows
}
