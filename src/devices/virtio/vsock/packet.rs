//! The virtio-vsock packet header (virtio 1.2 §5.10.6, `struct virtio_vsock_hdr`): 44
//! little-endian bytes in front of every packet, in both directions.

/// Connection request, response, reset, clean shutdown, data, credit update and credit
/// request (`VIRTIO_VSOCK_OP_*`).
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more data / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Stream sockets: the only type ember serves (SEQPACKET needs a feature ember does not
/// offer, as Firecracker).
pub const TYPE_STREAM: u16 = 1;

/// The host's CID.
pub const HOST_CID: u64 = 2;

pub const HDR_LEN: usize = 44;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_LEN], at: usize) -> u16 {
    let mut v = [0u8; 2];
    v.copy_from_slice(b.get(at..at + 2).unwrap_or(&[0; 2]));
    u16::from_le_bytes(v)
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(b.get(at..at + 4).unwrap_or(&[0; 4]));
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(b.get(at..at + 8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(v)
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        let fields: [(usize, &[u8]); 10] = [
            (0, &self.src_cid.to_le_bytes()),
            (8, &self.dst_cid.to_le_bytes()),
            (16, &self.src_port.to_le_bytes()),
            (20, &self.dst_port.to_le_bytes()),
            (24, &self.len.to_le_bytes()),
            (28, &self.type_.to_le_bytes()),
            (30, &self.op.to_le_bytes()),
            (32, &self.flags.to_le_bytes()),
            (36, &self.buf_alloc.to_le_bytes()),
            (40, &self.fwd_cnt.to_le_bytes()),
        ];
        for (at, v) in fields {
            if let Some(dst) = b.get_mut(at..at + v.len()) {
                dst.copy_from_slice(v);
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1122_3344,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 65536,
            fwd_cnt: 7,
        };
        let b = h.to_bytes();
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(b[0], 3);
        assert_eq!(b[16..20], [0x44, 0x33, 0x22, 0x11]);
        assert_eq!(b[30], OP_RW as u8);
        assert_eq!(b[40], 7);
    }
}
