//! The MMDS endpoint (`mmds::stack::MmdsStack`): frames a guest sends to the MMDS address
//! (ARP, then TCP carrying HTTP to the metadata store), and what the endpoint sends back,
//! under the VMM thread's filter.
//!
//! Input: one byte of settings (bit 0: V2, bit 1: imds_compat), then records, each a kind
//! byte: 0 a raw frame (u16 length, bytes); 1 an ARP request (u8: for the MMDS or not,
//! then the sender's MAC); 2 a TCP segment from one of 40 ports (u8 port, i16 offset from
//! the next sequence number the port would use, u8 flags, u16 length, data); 3 draining
//! (u8: up to how many frames). The client side follows what the endpoint answers, so
//! segments land in and out of its windows. Afterwards: bounded connections and buffers,
//! every answer a well-formed frame with valid checksums, and the endpoint runs dry.
#![no_main]

use std::collections::HashMap;

use ember::mmds::stack::{
    DEFAULT_IPV4, MAX_CONNECTIONS, MMDS_MAC, MmdsStack, REQ_BUF, is_mmds_frame,
};
use ember::mmds::{Mmds, MmdsVersion, lock};
use ember_fuzz::{Confined, Input, ThreadKind};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static VMM: Confined = Confined::start(ThreadKind::Vmm);
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    VMM.with(|v| v.run(move || run(&data)));
});

const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const GUEST_IP: [u8; 4] = [169, 254, 1, 2];

fn sum(parts: &[&[u8]]) -> u16 {
    let mut s = 0u32;
    for p in parts {
        for w in p.chunks(2) {
            s += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn tcp(port: u16, seq: u32, ack: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut f = MMDS_MAC.to_vec();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[8, 0, 0x45, 0]);
    f.extend_from_slice(&((40 + data.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&DEFAULT_IPV4.octets());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&80u16.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&ack.to_be_bytes());
    f.extend_from_slice(&[0x50, flags, 0x40, 0, 0, 0, 0, 0]);
    f.extend_from_slice(data);
    f
}

/// Checks one answer and returns (port, sequence number after it) for TCP.
fn check_answer(f: &[u8]) -> Option<(u16, u32)> {
    assert!(f.len() >= 42, "{} bytes", f.len());
    assert_eq!(f[6..12], MMDS_MAC);
    if f[12..14] == [8, 6] {
        assert_eq!(f.len(), 42);
        return None;
    }
    assert_eq!(f[12..14], [8, 0]);
    let ip = &f[14..];
    assert_eq!(sum(&[&ip[..20]]), 0, "IP checksum");
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(total, ip.len());
    let t = &ip[20..];
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&ip[12..20]);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&(t.len() as u16).to_be_bytes());
    assert_eq!(sum(&[&pseudo, t]), 0, "TCP checksum");
    let off = usize::from(t[12] >> 4) * 4;
    assert!(off >= 20 && off <= t.len());
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let flags = t[13];
    let len = (t.len() - off) as u32 + u32::from(flags & 3 != 0);
    Some((u16::from_be_bytes([t[2], t[3]]), seq.wrapping_add(len)))
}

fn run(data: &[u8]) {
    let mut input = Input(data);
    let settings = input.u8();
    let store = Mmds::shared(4096);
    {
        let mut m = lock(&store);
        let _ = m.put(serde_json::json!({
            "latest": {"meta-data": {"id": "i-1", "n": 3, "big": "x".repeat(3000)}}
        }));
        let v = if settings & 1 != 0 {
            MmdsVersion::V2
        } else {
            MmdsVersion::V1
        };
        m.configure(v, settings & 2 != 0);
    }
    let mut s = MmdsStack::new(DEFAULT_IPV4, store);
    // Per port: (our next sequence number, the endpoint's next one as last seen).
    let mut ports: HashMap<u16, (u32, u32)> = HashMap::new();
    let mut buf = vec![0u8; 2048];
    let mut drain = |s: &mut MmdsStack, ports: &mut HashMap<u16, (u32, u32)>, max: usize| {
        for _ in 0..max {
            let Some(n) = s.write_next_frame(&mut buf) else {
                break;
            };
            if let Some((port, next)) = check_answer(&buf[..n]) {
                ports.entry(port).or_insert((0, 0)).1 = next;
            }
        }
    };
    while !input.0.is_empty() {
        match input.u8() % 4 {
            0 => {
                let len = usize::from(input.u16()) % 2048;
                let f = input.bytes(len);
                let taken = s.detour(f);
                assert_eq!(taken, is_mmds_frame(f, DEFAULT_IPV4));
            }
            1 => {
                let ours = input.u8() & 1 != 0;
                let sha = input.bytes(6);
                let mut f = vec![0xff; 6];
                f.extend_from_slice(&GUEST_MAC);
                f.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
                f.extend_from_slice(sha);
                f.resize(28, 0);
                f.extend_from_slice(&GUEST_IP);
                f.extend_from_slice(&[0; 6]);
                let target = if ours {
                    DEFAULT_IPV4.octets()
                } else {
                    [169, 254, 9, 9]
                };
                f.extend_from_slice(&target);
                assert_eq!(s.detour(&f), ours);
            }
            2 => {
                let port = 1000 + u16::from(input.u8() % 40);
                let off = input.u16() as i16;
                let flags = input.u8();
                let len = usize::from(input.u16()) % 3000;
                let payload = input.bytes(len).to_vec();
                let (ours, theirs) = *ports.entry(port).or_insert((1, 0));
                let seq = ours.wrapping_add(off as i32 as u32);
                assert!(s.detour(&tcp(port, seq, theirs, flags, &payload)));
                let used = payload.len() as u32 + u32::from(flags & 3 != 0);
                ports.insert(port, (seq.wrapping_add(used), theirs));
            }
            _ => {
                let max = usize::from(input.u8());
                drain(&mut s, &mut ports, max);
            }
        }
        assert!(s.connections() <= MAX_CONNECTIONS);
        assert!(s.buffered() <= MAX_CONNECTIONS * REQ_BUF + 256 * 1024 + 8192);
    }
    let mut steps = 0;
    while s.write_next_frame(&mut buf).is_some() {
        steps += 1;
        assert!(steps < 100_000, "the endpoint never runs dry");
    }
}
