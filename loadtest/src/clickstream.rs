//! The clickstream generator.

use std::fmt::Write;

use crate::rng::{Rng, Zipf};

/// Generator parameters.
#[derive(Clone, Debug)]
pub struct Params {
    /// Events to produce (approximately; sessions are whole).
    pub events: usize,
    pub users: usize,
    pub products: usize,
    pub seed: u64,
    /// Event time of the first event (epoch ms).
    pub start_ms: i64,
    /// Simulated events per second of event time.
    pub rate: f64,
    /// Fraction of events delivered up to 1.5 s late (within a 2 s bound: reordered, not late).
    pub reorder: f64,
    /// Fraction of events delivered 3–10 s behind (late for a 2 s bound).
    pub late: f64,
    /// Malformed lines mixed in (not JSON, or without `eventTime`).
    pub malformed: usize,
    /// A flash sale: one product bought by many users within minutes.
    pub flash_sale: bool,
    /// Event time during which sessions already run before `start_ms` (their
    /// earlier events are not produced), and the stream ends at the last
    /// session's start: then events arrive at `rate` per second of event time
    /// from first to last, as from a site that was busy before and stays busy
    /// (0: every session starts at or after `start_ms`, and the stream thins
    /// out at its end as the last sessions finish).
    pub warm_ms: i64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            events: 10_000,
            users: 20_000,
            products: 5_000,
            seed: 42,
            start_ms: 1_700_000_000_000,
            rate: 2.0,
            reorder: 0.01,
            late: 0.0,
            malformed: 0,
            flash_sale: true,
            warm_ms: 0,
        }
    }
}

struct Category {
    code: &'static str,
    weight: f64,
    price: (f64, f64),
    brands: &'static [&'static str],
}

const CATEGORIES: &[Category] = &[
    Category { code: "electronics.smartphone", weight: 18.0, price: (250.0, 1300.0), brands: &["samsung", "apple", "xiaomi", "huawei", "oppo"] },
    Category { code: "electronics.audio.headphone", weight: 9.0, price: (20.0, 350.0), brands: &["sony", "apple", "jbl", "xiaomi"] },
    Category { code: "electronics.accessories.powerbank", weight: 5.0, price: (12.0, 80.0), brands: &["xiaomi", "anker", "baseus"] },
    Category { code: "electronics.video.tv", weight: 7.0, price: (180.0, 1600.0), brands: &["samsung", "lg", "tcl", "hisense"] },
    Category { code: "computers.notebook", weight: 8.0, price: (350.0, 2200.0), brands: &["lenovo", "hp", "asus", "apple", "acer"] },
    Category { code: "appliances.kitchen.kettle", weight: 6.0, price: (12.0, 90.0), brands: &["philips", "tefal", "xiaomi", "bosch"] },
    Category { code: "apparel.shoes", weight: 12.0, price: (30.0, 220.0), brands: &["nike", "adidas", "puma", "skechers"] },
    Category { code: "furniture.living_room.sofa", weight: 4.0, price: (200.0, 1400.0), brands: &["ikea", "ashley", "kuka"] },
    Category { code: "beauty.skincare", weight: 8.0, price: (8.0, 120.0), brands: &["loreal", "nivea", "olay"] },
    Category { code: "kids.toys", weight: 6.0, price: (5.0, 95.0), brands: &["lego", "mattel", "hasbro"] },
];

const PHONE: usize = 0;
const HEADPHONE: usize = 1;
const POWERBANK: usize = 2;

struct Product {
    id: u64,
    cat: usize,
    brand: &'static str,
    base: f64,
    /// (from, to, factor): a discount period in event time.
    discount: Option<(i64, i64, f64)>,
}

impl Product {
    fn price(&self, t: i64) -> f64 {
        let f = match self.discount {
            Some((a, b, f)) if t >= a && t < b => f,
            _ => 1.0,
        };
        (self.base * f * 100.0).round() / 100.0
    }
}

#[derive(Clone, Copy)]
enum Kind {
    View,
    Cart,
    Remove,
    Purchase,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Cart => "cart",
            Kind::Remove => "remove_from_cart",
            Kind::Purchase => "purchase",
        }
    }
}

struct Ev {
    t: i64,
    deliver: i64,
    seq: u64,
    kind: Kind,
    product: usize,
    user: u64,
    session: u64,
}

/// Generates the stream as JSON lines in delivery order.
pub fn generate(p: &Params) -> Vec<String> {
    let mut rng = Rng::new(p.seed);
    let span = ((p.events as f64 / p.rate.max(1e-6)) * 1000.0) as i64;

    // Products, by category, with a popularity order inside each.
    let total_w: f64 = CATEGORIES.iter().map(|c| c.weight).sum();
    let mut products = Vec::with_capacity(p.products);
    let mut by_cat: Vec<Vec<usize>> = vec![Vec::new(); CATEGORIES.len()];
    for i in 0..p.products.max(CATEGORIES.len()) {
        let cat = if i < CATEGORIES.len() {
            i
        } else {
            let mut x = rng.f64() * total_w;
            let mut c = 0;
            while x >= CATEGORIES[c].weight && c + 1 < CATEGORIES.len() {
                x -= CATEGORIES[c].weight;
                c += 1;
            }
            c
        };
        let cd = &CATEGORIES[cat];
        let (lo, hi) = cd.price;
        let base = (lo * (hi / lo).powf(rng.f64()) * 100.0).round() / 100.0;
        let discount = if rng.chance(0.3) {
            let from = p.start_ms + rng.below(span.max(1) as u64) as i64;
            let len = 600_000 + rng.below(7_200_000) as i64;
            Some((from, from + len, 0.7 + rng.f64() * 0.25))
        } else {
            None
        };
        by_cat[cat].push(products.len());
        products.push(Product {
            id: 1_000_000 + i as u64,
            cat,
            brand: cd.brands[rng.below(cd.brands.len() as u64) as usize],
            base,
            discount,
        });
    }
    let cat_zipf: Vec<Zipf> = by_cat.iter().map(|v| Zipf::new(v.len().max(1), 1.1)).collect();
    let user_zipf = Zipf::new(p.users.max(1), 0.6);
    let cat_pick = |rng: &mut Rng| {
        let mut x = rng.f64() * total_w;
        let mut c = 0;
        while x >= CATEGORIES[c].weight && c + 1 < CATEGORIES.len() {
            x -= CATEGORIES[c].weight;
            c += 1;
        }
        c
    };
    let pick_in = |rng: &mut Rng, cat: usize| by_cat[cat][cat_zipf[cat].sample(rng).min(by_cat[cat].len() - 1)];

    let mut evs: Vec<Ev> = Vec::with_capacity(p.events + 256);
    let mut seq = 0u64;
    let visible_from = if p.warm_ms > 0 { p.start_ms } else { i64::MIN };
    let mut push = |evs: &mut Vec<Ev>, t: i64, kind: Kind, product: usize, user: u64, session: u64| {
        if t < visible_from {
            return;
        }
        seq += 1;
        evs.push(Ev { t, deliver: t, seq, kind, product, user, session });
    };
    // Users' habits: some never buy (churn candidates), most buy now and then.
    let buyer = |u: u64| (u.wrapping_mul(0x9E37_79B9) >> 7) % 10 >= 3;

    let mean_gap = 1000.0 / p.rate.max(1e-6) * 9.0;
    let mut t = p.start_ms - p.warm_ms.max(0);
    // Warm: sessions start until `span` of event time is covered (the events
    // in it come to about `events`); otherwise until there are `events`.
    while if p.warm_ms > 0 { t < p.start_ms + span } else { evs.len() < p.events } {
        t += rng.exp(mean_gap) as i64;
        let user = 10_000 + user_zipf.sample(&mut rng) as u64;
        let session = rng.next_u64();
        let steps = 1 + rng.exp(9.0) as usize;
        let interest = cat_pick(&mut rng);
        let mut now = t;
        let mut viewed: Vec<usize> = Vec::new();
        let mut cart: Vec<usize> = Vec::new();
        for _ in 0..steps.min(60) {
            now += 2_000 + rng.exp(25_000.0) as i64;
            let r = rng.f64();
            if r < 0.10 && !viewed.is_empty() {
                let prod = viewed[rng.below(viewed.len() as u64) as usize];
                push(&mut evs, now, Kind::Cart, prod, user, session);
                cart.push(prod);
            } else if r < 0.13 && !cart.is_empty() {
                let i = rng.below(cart.len() as u64) as usize;
                push(&mut evs, now, Kind::Remove, cart.swap_remove(i), user, session);
            } else if r < 0.19 && !cart.is_empty() && buyer(user) {
                let i = rng.below(cart.len() as u64) as usize;
                push(&mut evs, now, Kind::Purchase, cart.swap_remove(i), user, session);
            } else {
                let prod = if !viewed.is_empty() && rng.chance(0.25) {
                    viewed[rng.below(viewed.len() as u64) as usize]
                } else if rng.chance(0.8) {
                    pick_in(&mut rng, interest)
                } else {
                    {
                    let c = cat_pick(&mut rng);
                    pick_in(&mut rng, c)
                }
                };
                push(&mut evs, now, Kind::View, prod, user, session);
                viewed.push(prod);
                // Phone shoppers look at accessories.
                if products[prod].cat == PHONE && rng.chance(0.3) {
                    now += 3_000 + rng.exp(20_000.0) as i64;
                    let c = if rng.chance(0.6) { HEADPHONE } else { POWERBANK };
                    let acc = pick_in(&mut rng, c);
                    push(&mut evs, now, Kind::View, acc, user, session);
                    viewed.push(acc);
                }
            }
        }
    }

    if p.flash_sale && !by_cat[PHONE].is_empty() {
        let star = by_cat[PHONE][0];
        let at = p.start_ms + span * 2 / 5;
        for i in 0..150u64 {
            let user = 10_000 + user_zipf.sample(&mut rng) as u64;
            let session = rng.next_u64();
            let tv = at + (i as i64) * 3_000 + rng.below(2_000) as i64;
            push(&mut evs, tv, Kind::View, star, user, session);
            push(&mut evs, tv + 20_000 + rng.below(60_000) as i64, Kind::Purchase, star, user, session);
        }
    }

    if p.warm_ms > 0 {
        // Past the last session's start the stream would thin out; and the
        // flash sale's later views and purchases (minutes after it starts)
        // would be the input's last events, event time jumping minutes ahead
        // at its very end, which a site that stays busy never sees.
        evs.retain(|e| e.t <= t);
    }

    for e in &mut evs {
        if rng.chance(p.late) {
            e.deliver = e.t + 3_000 + rng.below(7_000) as i64;
        } else if rng.chance(p.reorder) {
            e.deliver = e.t + rng.below(1_500) as i64;
        }
    }
    evs.sort_by_key(|e| (e.deliver, e.seq));

    let mut out = Vec::with_capacity(evs.len() + p.malformed);
    let mut malformed_left = p.malformed;
    let every = if p.malformed > 0 { (evs.len() / (p.malformed + 1)).max(1) } else { usize::MAX };
    for (i, e) in evs.iter().enumerate() {
        let prod = &products[e.product];
        let cat = &CATEGORIES[prod.cat];
        let mut s = String::with_capacity(240);
        let _ = write!(
            s,
            "{{\"id\":{},\"eventTime\":{},\"eventType\":\"{}\",\"productId\":{},\"categoryId\":{},\"categoryCode\":\"{}\",\"brand\":\"{}\",\"price\":{:.2},\"userId\":{},\"userSession\":\"{:016x}\"}}",
            i + 1,
            e.t,
            e.kind.name(),
            prod.id,
            2_053_013_555_000_000u64 + prod.cat as u64,
            cat.code,
            prod.brand,
            prod.price(e.t),
            e.user,
            e.session
        );
        out.push(s);
        if malformed_left > 0 && (i + 1) % every == 0 {
            out.push(if malformed_left.is_multiple_of(2) {
                format!("{{\"id\":\"bad-{malformed_left}\",\"eventType\":\"view\",\"productId\":1000001}}")
            } else {
                "<html>502 Bad Gateway</html>".to_string()
            });
            malformed_left -= 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warm_stream_keeps_its_rate_to_the_end() {
        let rate = 200.0;
        let times = |warm_ms: i64| -> Vec<i64> {
            let p = Params { events: 20_000, rate, warm_ms, flash_sale: false, reorder: 0.0, ..Params::default() };
            let mut t: Vec<i64> = generate(&p).iter().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["eventTime"].as_i64().unwrap()).collect();
            t.sort_unstable();
            t
        };
        // Events per second of event time over the last tenth of the stream, against the rate.
        let tail_rate = |t: &[i64]| {
            let from = t[t.len() * 9 / 10];
            let n = t.len() - t.len() * 9 / 10;
            n as f64 / ((t[t.len() - 1] - from) as f64 / 1000.0)
        };
        let cold = times(0);
        let warm = times(1_800_000);
        assert!(tail_rate(&cold) < rate / 5.0, "a cold stream thins out at its end: {}", tail_rate(&cold));
        let r = tail_rate(&warm);
        assert!(r > rate * 0.5 && r < rate * 2.0, "a warm stream keeps about its rate: {r}");
        assert!(warm[0] >= Params::default().start_ms);
        assert!(warm.len() > 10_000 && warm.len() < 40_000, "about `events`: {}", warm.len());
    }

    #[test]
    fn a_warm_stream_with_a_flash_sale_does_not_jump_ahead_at_its_end() {
        let rate = 200.0;
        let p = Params { events: 20_000, rate, warm_ms: 1_800_000, flash_sale: true, reorder: 0.0, ..Params::default() };
        let mut t: Vec<i64> = generate(&p).iter().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["eventTime"].as_i64().unwrap()).collect();
        t.sort_unstable();
        // The last hundred events span about half a second at this rate, not the sale's minutes.
        let last = (t[t.len() - 1] - t[t.len() - 100]) as f64 / 1000.0;
        assert!(last < 5.0, "the last 100 events span {last} s of event time");
    }

    #[test]
    fn deterministic_and_sized() {
        let p = Params { events: 2_000, users: 300, products: 200, ..Params::default() };
        let a = generate(&p);
        let b = generate(&p);
        assert_eq!(a, b);
        assert!(a.len() >= 2_000);
        let kinds: std::collections::HashSet<String> = a
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["eventType"].as_str().unwrap().to_string())
            .collect();
        for k in ["view", "cart", "purchase", "remove_from_cart"] {
            assert!(kinds.contains(k), "no {k} events");
        }
    }
}
