/* virtio-net test: MAC, one broadcast frame out (ethertype 0x88b5), then wait for a
 * frame of the same ethertype to come back. */
#include "virtio.h"

#define VIRTIO_NET_F_MAC 5
#define NET_HDR_SIZE 12 /* struct virtio_net_hdr with VERSION_1 (num_buffers included) */
#define ETH_HDR_SIZE 14
#define ETH_MIN_FRAME 60
#define ETHERTYPE_TEST 0x88b5
/* Without mergeable buffers every RX buffer must hold a whole 1514-byte frame. */
#define RX_BUF_SIZE 2048
#define RX_BUFS VQ_SIZE
#define TX_TIMEOUT_MS 2000
#define RX_TIMEOUT_MS 5000

static struct virtqueue rxq, txq;
static uint8_t rx_rings[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t tx_rings[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t rx_bufs[RX_BUFS][RX_BUF_SIZE] NOINIT __attribute__((aligned(4096)));
static uint8_t tx_buf[NET_HDR_SIZE + ETH_MIN_FRAME] NOINIT __attribute__((aligned(64)));

static void post_rx(uint16_t i)
{
	rxq.desc[i] = (struct vring_desc){(uint64_t)rx_bufs[i], RX_BUF_SIZE, VRING_DESC_F_WRITE, 0};
	vq_push(&rxq, i);
}

static void print_payload(const uint8_t *p, uint32_t len)
{
	for (uint32_t i = 0; i < len && p[i]; i++)
		if (p[i] >= 0x20 && p[i] < 0x7f)
			putc_serial((char)p[i]);
}

void net_test(uint64_t base)
{
	uint64_t features;
	if (virtio_negotiate(base, "net", 1u << VIRTIO_NET_F_MAC, &features) != 0)
		return;
	if (virtio_setup_queue(base, "net", 0, &rxq, rx_rings, VQ_SIZE) != 0 ||
	    virtio_setup_queue(base, "net", 1, &txq, tx_rings, VQ_SIZE) != 0)
		return;
	virtio_driver_ok(base);

	uint8_t mac[6] = {0x02, 0, 0, 0, 0, 0x01};
	if (features & (1ull << VIRTIO_NET_F_MAC)) {
		for (int i = 0; i < 6; i++)
			mac[i] = mmio_read8(base + VIRTIO_MMIO_CONFIG + (uint64_t)i);
	} else {
		puts_serial("net: error: device offers no MAC, using 02:00:00:00:00:01\n");
	}
	kprintf("net: mac=%02x:%02x:%02x:%02x:%02x:%02x\n", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);

	for (uint16_t i = 0; i < RX_BUFS; i++)
		post_rx(i);
	vq_notify(&rxq);

	static const char text[] = "ember-test-guest ping";
	uint8_t *frame = tx_buf + NET_HDR_SIZE;
	memset(tx_buf, 0, sizeof(tx_buf));
	memset(frame, 0xff, 6);
	memcpy(frame + 6, mac, 6);
	frame[12] = ETHERTYPE_TEST >> 8;
	frame[13] = ETHERTYPE_TEST & 0xff;
	memcpy(frame + ETH_HDR_SIZE, text, sizeof(text) - 1);
	txq.desc[0] = (struct vring_desc){(uint64_t)tx_buf, sizeof(tx_buf), 0, 0};
	vq_push(&txq, 0);
	vq_notify(&txq);
	uint32_t id, len;
	if (vq_wait(&txq, TX_TIMEOUT_MS, &id, &len) != 0) {
		puts_serial("net: error: transmit not completed\n");
		return;
	}
	puts_serial("net: sent\n");

	uint64_t end = rdtsc() + tsc_hz() / 1000 * RX_TIMEOUT_MS;
	for (;;) {
		uint64_t now = rdtsc();
		if (now >= end || vq_wait(&rxq, (end - now) * 1000 / tsc_hz() + 1, &id, &len) != 0) {
			puts_serial("net: timeout\n");
			return;
		}
		if (id >= RX_BUFS || len < NET_HDR_SIZE || len > RX_BUF_SIZE) {
			kprintf("net: error: bad used element id=%u len=%u\n", id, len);
			return;
		}
		const uint8_t *f = rx_bufs[id] + NET_HDR_SIZE;
		uint32_t flen = len - NET_HDR_SIZE;
		if (flen >= ETH_HDR_SIZE && f[12] == (ETHERTYPE_TEST >> 8) && f[13] == (ETHERTYPE_TEST & 0xff)) {
			kprintf("net: received %u ", flen);
			print_payload(f + ETH_HDR_SIZE, flen - ETH_HDR_SIZE);
			putc_serial('\n');
			return;
		}
		/* Some other traffic (IPv6 router solicitations on a fresh tap): recycle. */
		post_rx((uint16_t)id);
		vq_notify(&rxq);
	}
}
