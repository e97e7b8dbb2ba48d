#!/usr/bin/env python3
"""Writes samples/orders.jsonl: the order events of the sample (source `orders`),
over the same stretch of event time as samples/clickstream.jsonl and its users.
Deterministic (fixed seed): most orders are paid within a few minutes, some
late or never (order_unpaid), and two devices place bursts of orders
(order_brushing). Run from the repository root: scripts/gen-orders-sample.py"""
import json
import random

rng = random.Random(20261206)
start, end = 1700000031301, 1700006805986
events = []
n = 0


def order(t, user, device, amount):
    global n
    n += 1
    oid = f"o-{n:05d}"
    events.append({"eventTime": t, "eventType": "order_created", "orderId": oid, "userId": user, "deviceId": device, "amount": amount})
    r = rng.random()
    if r < 0.85:
        events.append({"eventTime": t + rng.randint(20_000, 14 * 60_000), "eventType": "order_paid", "orderId": oid, "userId": user, "amount": amount})
    elif r < 0.95:
        events.append({"eventTime": t + rng.randint(16 * 60_000, 40 * 60_000), "eventType": "order_paid", "orderId": oid, "userId": user, "amount": amount})


for _ in range(300):
    user = rng.randint(10000, 10299)
    order(rng.randint(start, end - 45 * 60_000), user, f"d-{user}", round(rng.uniform(9, 900), 2))
for device in ("d-farm-1", "d-farm-2"):
    t = rng.randint(start, end - 45 * 60_000)
    for _ in range(6):
        t += rng.randint(30_000, 90_000)
        order(t, rng.randint(10000, 10299), device, round(rng.uniform(1, 20), 2))

# Written in event time order, with the small disorder a real feed has.
events.sort(key=lambda e: e["eventTime"] + rng.randint(0, 1500))
with open("samples/orders.jsonl", "w") as f:
    for e in events:
        f.write(json.dumps(e, separators=(",", ":")) + "\n")
print(f"samples/orders.jsonl: {len(events)} events, {n} orders")
