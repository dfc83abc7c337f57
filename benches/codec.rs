//! Codec benchmark: frames encoded and decoded per second, for the packets on the hot path.
//!
//! `cargo bench --bench codec`. Criterion reports time per frame; throughput is in elements (frames) per second.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hubbub::framing::split_frame;
use hubbub::protocol::{encode_deliver, is_packet_kind, is_request_kind, Packet, Request};
use std::hint::black_box;

const TEXT: &str = "sixty-four bytes of message text, which is what the benchmark uses";

fn send_frames(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let request = Request::Send {
            recipient: "bob".into(),
            client_msg_id: i as u64,
            text: TEXT[..64].into(),
        };
        request.encode(i as u32 + 1, &mut out);
    }
    out
}

fn codec(c: &mut Criterion) {
    const N: usize = 1000;
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(N as u64));

    let frames = send_frames(N);
    group.bench_function("split+decode Send", |b| {
        b.iter(|| {
            let mut pos = 0;
            while let Ok(Some(frame)) = split_frame(&frames[pos..], 65536, is_request_kind) {
                pos += frame.len;
                black_box(Request::decode(frame.header.kind, frame.body).ok());
            }
        })
    });

    let mut out = Vec::with_capacity(N * 128);
    group.bench_function("encode Deliver (borrowed, hot path)", |b| {
        b.iter(|| {
            out.clear();
            for i in 0..N as u64 {
                encode_deliver(&mut out, i, "alice", "bob", 1_700_000_000_000, &TEXT[..64]);
            }
            black_box(out.len())
        })
    });

    group.bench_function("encode Ack", |b| {
        b.iter(|| {
            out.clear();
            for i in 0..N as u64 {
                Packet::Ack {
                    message_id: i,
                    timestamp_ms: 1_700_000_000_000,
                }
                .encode(i as u32, &mut out);
            }
            black_box(out.len())
        })
    });

    let mut delivers = Vec::new();
    for i in 0..N as u64 {
        encode_deliver(&mut delivers, i, "alice", "bob", 1, &TEXT[..64]);
    }
    group.bench_function("split+decode Deliver (client side)", |b| {
        b.iter(|| {
            let mut pos = 0;
            while let Ok(Some(frame)) = split_frame(&delivers[pos..], 65536, is_packet_kind) {
                pos += frame.len;
                black_box(Packet::decode(&frame.header, frame.body).ok());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
