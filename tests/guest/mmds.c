/* MMDS client: a minimal ARP + TCP + HTTP/1.1 client over raw virtio-net frames, which
 * fetches metadata from the MMDS address (169.254.169.254 unless mmds_ip= says so).
 *
 * mmds_script=v1     listings, a nested key, JSON, a 404, then polls for a key the host
 *                    adds with PATCH /mmds after the line "mmds: waiting for patch";
 *                    last, a UDP frame to 169.254.169.253 (another address: the TAP's).
 * mmds_script=v2     the token flow: no token, a 1 s token, a wrong token, the expired
 *                    token, the EC2 header name, two requests on one connection.
 * mmds_script=bench  mmds_count= GETs on one connection, then on one connection each.
 *
 * Each request prints "mmds: <what> -> <status> <body>", newlines in the body as '|'.
 * An interface whose MMDS does not answer ARP prints "mmds: no arp reply". */
#include "virtio.h"

#define VIRTIO_NET_F_MAC 5
#define NET_HDR 12
#define RX_BUF_SIZE 2048
#define RX_BUFS VQ_SIZE
#define ETH 14
#define RESP_MAX 4096

static struct virtqueue rxq, txq;
static uint8_t rx_rings[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t tx_rings[VQ_RING_BYTES(VQ_SIZE)] NOINIT __attribute__((aligned(4096)));
static uint8_t rx_bufs[RX_BUFS][RX_BUF_SIZE] NOINIT __attribute__((aligned(4096)));
static uint8_t tx_buf[NET_HDR + 1600] NOINIT __attribute__((aligned(64)));
static uint8_t frame[RX_BUF_SIZE] NOINIT;
static uint32_t frame_len;
static char resp[RESP_MAX + 1] NOINIT;
static char reqbuf[1024] NOINIT;
static char token[128] NOINIT;
static char short_token[128] NOINIT;

static uint8_t my_mac[6], srv_mac[6];
static const uint8_t my_ip[4] = {169, 254, 1, 2};
static uint8_t srv_ip[4] = {169, 254, 169, 254};
static uint16_t next_port = 40000;

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}
static void put32(uint8_t *p, uint32_t v)
{
	put16(p, (uint16_t)(v >> 16));
	put16(p + 2, (uint16_t)v);
}
static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)((p[0] << 8) | p[1]);
}
static uint32_t get32(const uint8_t *p)
{
	return ((uint32_t)get16(p) << 16) | get16(p + 2);
}

static uint32_t sum16(const uint8_t *p, size_t n, uint32_t s)
{
	for (size_t i = 0; i + 1 < n; i += 2)
		s += get16(p + i);
	if (n & 1)
		s += (uint32_t)p[n - 1] << 8;
	return s;
}
static uint16_t fold(uint32_t s)
{
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (uint16_t)~s;
}

static void post_rx(uint16_t i)
{
	rxq.desc[i] = (struct vring_desc){(uint64_t)rx_bufs[i], RX_BUF_SIZE, VRING_DESC_F_WRITE, 0};
	vq_push(&rxq, i);
}

/* Sends the frame at tx_buf + NET_HDR. */
static int tx(size_t len)
{
	if (len < 60) {
		memset(tx_buf + NET_HDR + len, 0, 60 - len);
		len = 60;
	}
	memset(tx_buf, 0, NET_HDR);
	txq.desc[0] = (struct vring_desc){(uint64_t)tx_buf, (uint32_t)(NET_HDR + len), 0, 0};
	vq_push(&txq, 0);
	vq_notify(&txq);
	uint32_t id, l;
	if (vq_wait(&txq, 2000, &id, &l) != 0) {
		puts_serial("mmds: error: transmit not completed\n");
		return -1;
	}
	return 0;
}

/* The next received frame into `frame` (buffer recycled), or -1 on timeout. */
static int rx(uint64_t timeout_ms)
{
	uint32_t id, len;
	if (vq_wait(&rxq, timeout_ms, &id, &len) != 0)
		return -1;
	if (id >= RX_BUFS || len < NET_HDR || len > RX_BUF_SIZE) {
		kprintf("mmds: error: bad used element id=%u len=%u\n", id, len);
		return -1;
	}
	frame_len = len - NET_HDR;
	memcpy(frame, rx_bufs[id] + NET_HDR, frame_len);
	post_rx((uint16_t)id);
	vq_notify(&rxq);
	return 0;
}

static int arp(void)
{
	uint8_t *f = tx_buf + NET_HDR;
	memset(f, 0xff, 6);
	memcpy(f + 6, my_mac, 6);
	put16(f + 12, 0x0806);
	static const uint8_t hdr[8] = {0, 1, 8, 0, 6, 4, 0, 1};
	memcpy(f + ETH, hdr, 8);
	memcpy(f + ETH + 8, my_mac, 6);
	memcpy(f + ETH + 14, my_ip, 4);
	memset(f + ETH + 18, 0, 6);
	memcpy(f + ETH + 24, srv_ip, 4);
	if (tx(ETH + 28) != 0)
		return -1;
	uint64_t end = rdtsc() + tsc_hz() / 1000 * 1000;
	while (rdtsc() < end) {
		if (rx(100) != 0)
			continue;
		if (frame_len >= ETH + 28 && get16(frame + 12) == 0x0806 && get16(frame + ETH + 6) == 2 &&
		    memcmp(frame + ETH + 14, srv_ip, 4) == 0) {
			memcpy(srv_mac, frame + ETH + 8, 6);
			return 0;
		}
	}
	return -1;
}

struct conn {
	uint16_t port;
	uint32_t snd_nxt, rcv_nxt;
	int peer_fin;
};

static int tcp_send(struct conn *c, uint8_t flags, const void *data, size_t n)
{
	uint8_t *f = tx_buf + NET_HDR;
	size_t opt = (flags & 0x02) ? 4 : 0;
	size_t tcp_len = 20 + opt + n;
	memcpy(f, srv_mac, 6);
	memcpy(f + 6, my_mac, 6);
	put16(f + 12, 0x0800);
	uint8_t *ip = f + ETH;
	memset(ip, 0, 20);
	ip[0] = 0x45;
	put16(ip + 2, (uint16_t)(20 + tcp_len));
	ip[6] = 0x40;
	ip[8] = 64;
	ip[9] = 6;
	memcpy(ip + 12, my_ip, 4);
	memcpy(ip + 16, srv_ip, 4);
	put16(ip + 10, fold(sum16(ip, 20, 0)));
	uint8_t *t = ip + 20;
	memset(t, 0, 20 + opt);
	put16(t, c->port);
	put16(t + 2, 80);
	put32(t + 4, c->snd_nxt);
	put32(t + 8, c->rcv_nxt);
	t[12] = (uint8_t)(((20 + opt) / 4) << 4);
	t[13] = flags;
	put16(t + 14, 16384);
	if (opt) {
		t[20] = 2;
		t[21] = 4;
		put16(t + 22, 1460);
	}
	memcpy(t + 20 + opt, data, n);
	uint8_t pseudo[12] = {0};
	memcpy(pseudo, my_ip, 4);
	memcpy(pseudo + 4, srv_ip, 4);
	pseudo[9] = 6;
	put16(pseudo + 10, (uint16_t)tcp_len);
	put16(t + 16, fold(sum16(t, tcp_len, sum16(pseudo, 12, 0))));
	c->snd_nxt += (uint32_t)n + ((flags & 0x03) ? 1 : 0);
	return tx(ETH + 20 + tcp_len);
}

/* The next segment of connection `c`: returns its flags, or -1 on timeout. */
static int tcp_recv(struct conn *c, uint64_t timeout_ms, uint32_t *seq, uint32_t *ack, const uint8_t **data,
		    uint32_t *n)
{
	uint64_t end = rdtsc() + tsc_hz() / 1000 * timeout_ms;
	while (rdtsc() < end) {
		if (rx(timeout_ms) != 0)
			return -1;
		if (frame_len < ETH + 40 || get16(frame + 12) != 0x0800)
			continue;
		const uint8_t *ip = frame + ETH;
		uint32_t ihl = (uint32_t)(ip[0] & 0xf) * 4;
		uint32_t total = get16(ip + 2);
		if (ip[9] != 6 || memcmp(ip + 12, srv_ip, 4) != 0 || total > frame_len - ETH || total < ihl + 20)
			continue;
		const uint8_t *t = ip + ihl;
		if (get16(t) != 80 || get16(t + 2) != c->port)
			continue;
		uint32_t off = (uint32_t)(t[12] >> 4) * 4;
		*seq = get32(t + 4);
		*ack = get32(t + 8);
		*data = t + off;
		*n = total - ihl - off;
		return t[13];
	}
	return -1;
}

static int conn_open(struct conn *c)
{
	c->port = next_port++;
	c->snd_nxt = 1000u + c->port * 7919u;
	c->rcv_nxt = 0;
	c->peer_fin = 0;
	if (tcp_send(c, 0x02, NULL, 0) != 0)
		return -1;
	uint32_t seq, ack, n;
	const uint8_t *d;
	for (;;) {
		int fl = tcp_recv(c, 2000, &seq, &ack, &d, &n);
		if (fl < 0 || (fl & 0x04))
			return -1;
		if ((fl & 0x12) == 0x12 && ack == c->snd_nxt) {
			c->rcv_nxt = seq + 1;
			return tcp_send(c, 0x10, NULL, 0);
		}
	}
}

/* Sends `req` and reads one whole response into `resp`; returns the status or -1. The
 * body starts at *body. */
static int conn_request(struct conn *c, const char *req, const char **body)
{
	if (tcp_send(c, 0x18, req, strlen(req)) != 0)
		return -1;
	uint32_t len = 0, seq, ack, n;
	const uint8_t *d;
	for (;;) {
		resp[len] = 0;
		const char *hdr_end = NULL;
		for (uint32_t i = 0; i + 3 < len; i++)
			if (memcmp(resp + i, "\r\n\r\n", 4) == 0) {
				hdr_end = resp + i + 4;
				break;
			}
		if (hdr_end) {
			uint64_t clen = 0;
			for (const char *p = resp; p + 16 < hdr_end; p++)
				if (memcmp(p, "Content-Length: ", 16) == 0) {
					parse_u64(p + 16, &clen);
					break;
				}
			if ((uint64_t)(hdr_end - resp) + clen <= len) {
				*body = hdr_end;
				resp[(hdr_end - resp) + clen] = 0;
				if (len < 12 || memcmp(resp, "HTTP/1.1 ", 9) != 0)
					return -1;
				return (resp[9] - '0') * 100 + (resp[10] - '0') * 10 + (resp[11] - '0');
			}
		}
		if (c->peer_fin)
			return -1;
		int fl = tcp_recv(c, 3000, &seq, &ack, &d, &n);
		if (fl < 0 || (fl & 0x04))
			return -1;
		if (seq != c->rcv_nxt) {
			tcp_send(c, 0x10, NULL, 0);
			continue;
		}
		if (n > RESP_MAX - len)
			n = RESP_MAX - len;
		memcpy(resp + len, d, n);
		len += n;
		c->rcv_nxt += n;
		if (fl & 0x01) {
			c->rcv_nxt++;
			c->peer_fin = 1;
		}
		if (n || (fl & 0x01))
			tcp_send(c, 0x10, NULL, 0);
	}
}

static void conn_close(struct conn *c)
{
	tcp_send(c, 0x11, NULL, 0);
	uint32_t seq, ack, n;
	const uint8_t *d;
	/* Until the server's FIN (if not seen yet) and the ACK of ours. */
	for (int i = 0; i < 8; i++) {
		int fl = tcp_recv(c, 500, &seq, &ack, &d, &n);
		if (fl < 0 || (fl & 0x04))
			return;
		if ((fl & 0x01) && !c->peer_fin) {
			c->rcv_nxt = seq + n + 1;
			c->peer_fin = 1;
			tcp_send(c, 0x10, NULL, 0);
		}
		if (c->peer_fin && ack == c->snd_nxt)
			return;
	}
}

static void print_result(const char *what, int status, const char *body)
{
	kprintf("mmds: %s -> %d ", what, status);
	for (const char *p = body; status > 0 && *p; p++)
		putc_serial(*p == '\n' ? '|' : *p);
	putc_serial('\n');
}

static size_t cat(size_t at, const char *s)
{
	size_t n = strlen(s);
	if (at + n >= sizeof(reqbuf))
		n = sizeof(reqbuf) - 1 - at;
	memcpy(reqbuf + at, s, n);
	reqbuf[at + n] = 0;
	return at + n;
}

/* One request on its own connection; `extra` header lines end in \r\n. */
static int fetch(const char *method, const char *path, const char *extra, const char **body)
{
	size_t at = cat(0, method);
	at = cat(at, " ");
	at = cat(at, path);
	at = cat(at, " HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n");
	at = cat(at, extra);
	cat(at, "\r\n");
	struct conn c;
	*body = "";
	if (conn_open(&c) != 0)
		return -1;
	/* conn_close reads control segments into `frame` only: *body stays valid. */
	int status = conn_request(&c, reqbuf, body);
	conn_close(&c);
	return status;
}

static void get(const char *what, const char *path, const char *extra)
{
	const char *body;
	int s = fetch("GET", path, extra, &body);
	print_result(what, s, body);
}

static void token_header(const char *name, const char *value, char *out, size_t cap)
{
	size_t a = strlen(name), b = strlen(value);
	if (a + b + 5 > cap) {
		out[0] = 0;
		return;
	}
	memcpy(out, name, a);
	memcpy(out + a, ": ", 2);
	memcpy(out + a + 2, value, b);
	memcpy(out + a + 2 + b, "\r\n", 3);
}

static void script_v1(void)
{
	get("listing", "/latest/meta-data/", "");
	get("key", "/latest/meta-data/ami-id", "");
	get("nested", "/latest/meta-data/network/interfaces/macs/02:29:96:8f:6a:2d/device-number", "");
	get("json", "/latest/meta-data/placement", "Accept: application/json\r\n");
	get("missing", "/latest/nope", "");
	puts_serial("mmds: waiting for patch\n");
	const char *body = "";
	int s = -1;
	uint64_t end = rdtsc() + tsc_hz() * 30;
	while (rdtsc() < end) {
		s = fetch("GET", "/latest/meta-data/patched", "", &body);
		if (s == 200)
			break;
		delay_ms(100);
	}
	print_result("patched", s, body);

	/* A UDP datagram to another link-local address goes to the TAP as before. */
	uint8_t *f = tx_buf + NET_HDR;
	memset(f, 0xff, 6);
	memcpy(f + 6, my_mac, 6);
	put16(f + 12, 0x0800);
	uint8_t *ip = f + ETH;
	static const char msg[] = "ember-mmds-other";
	size_t udp_len = 8 + sizeof(msg) - 1;
	memset(ip, 0, 28);
	ip[0] = 0x45;
	put16(ip + 2, (uint16_t)(20 + udp_len));
	ip[8] = 64;
	ip[9] = 17;
	memcpy(ip + 12, my_ip, 4);
	static const uint8_t other[4] = {169, 254, 169, 253};
	memcpy(ip + 16, other, 4);
	put16(ip + 10, fold(sum16(ip, 20, 0)));
	put16(ip + 20, 9999);
	put16(ip + 22, 9);
	put16(ip + 24, (uint16_t)udp_len);
	memcpy(ip + 28, msg, sizeof(msg) - 1);
	if (tx(ETH + 20 + udp_len) == 0)
		puts_serial("mmds: sent udp to 169.254.169.253\n");
}

static void script_v2(void)
{
	char hdr[200];
	const char *body;
	get("no token", "/latest/meta-data/ami-id", "");
	/* A 1 s token to see expire, and a 60 s one for the rest: on a loaded host the
	 * requests below may take longer than a second. */
	int s = fetch("PUT", "/latest/api/token", "X-metadata-token-ttl-seconds: 1\r\n", &body);
	print_result("token 1s", s == 200 ? 200 : s, s == 200 ? "(token)" : body);
	size_t tl = strlen(body);
	if (s != 200 || tl >= sizeof(short_token))
		return;
	memcpy(short_token, body, tl + 1);
	s = fetch("PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n", &body);
	tl = strlen(body);
	if (s != 200 || tl >= sizeof(token)) {
		print_result("token 60s", s, body);
		return;
	}
	memcpy(token, body, tl + 1);
	token_header("X-metadata-token", token, hdr, sizeof(hdr));
	get("with token", "/latest/meta-data/ami-id", hdr);
	token_header("X-metadata-token", "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff", hdr,
		     sizeof(hdr));
	get("wrong token", "/latest/meta-data/ami-id", hdr);
	delay_ms(1500);
	token_header("X-metadata-token", short_token, hdr, sizeof(hdr));
	get("expired token", "/latest/meta-data/ami-id", hdr);
	token_header("X-aws-ec2-metadata-token", token, hdr, sizeof(hdr));
	get("ec2 header", "/latest/meta-data/", hdr);

	/* Two requests on one connection. */
	struct conn c;
	if (conn_open(&c) != 0) {
		puts_serial("mmds: error: connect\n");
		return;
	}
	size_t at = cat(0, "GET /latest/meta-data/ami-id HTTP/1.1\r\n");
	at = cat(at, hdr);
	cat(at, "\r\n");
	for (int i = 0; i < 2; i++) {
		s = conn_request(&c, reqbuf, &body);
		print_result(i ? "keep-alive 2" : "keep-alive 1", s, body);
	}
	conn_close(&c);
}

static void script_bench(const char *cmdline)
{
	uint64_t count = 1000;
	const char *v = cmdline_find(cmdline, NULL, "mmds_count=");
	if (v)
		parse_u64(v, &count);
	const char *body;
	struct conn c;
	if (conn_open(&c) != 0) {
		puts_serial("mmds-bench: error: connect\n");
		return;
	}
	cat(0, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n");
	uint64_t hz = tsc_hz(), t0 = rdtsc(), ok = 0;
	for (uint64_t i = 0; i < count; i++)
		if (conn_request(&c, reqbuf, &body) == 200)
			ok++;
	uint64_t us = (rdtsc() - t0) * 1000000 / hz;
	conn_close(&c);
	kprintf("mmds-bench: keep-alive %lu/%lu ok in %lu us: %lu req/s, %lu us/request\n", ok, count, us,
		us ? ok * 1000000 / us : 0, ok ? us / ok : 0);
	uint64_t n2 = count / 4 ? count / 4 : 1;
	t0 = rdtsc();
	ok = 0;
	for (uint64_t i = 0; i < n2; i++)
		if (fetch("GET", "/latest/meta-data/ami-id", "", &body) == 200)
			ok++;
	us = (rdtsc() - t0) * 1000000 / hz;
	kprintf("mmds-bench: connection each %lu/%lu ok in %lu us: %lu req/s, %lu us/request\n", ok, n2, us,
		us ? ok * 1000000 / us : 0, ok ? us / ok : 0);
}

void mmds_test(uint64_t base, const char *cmdline)
{
	uint64_t features;
	if (virtio_negotiate(base, "mmds", 1u << VIRTIO_NET_F_MAC, &features) != 0)
		return;
	if (virtio_setup_queue(base, "mmds", 0, &rxq, rx_rings, VQ_SIZE) != 0 ||
	    virtio_setup_queue(base, "mmds", 1, &txq, tx_rings, VQ_SIZE) != 0)
		return;
	virtio_driver_ok(base);
	for (int i = 0; i < 6; i++)
		my_mac[i] = mmio_read8(base + VIRTIO_MMIO_CONFIG + (uint64_t)i);
	for (uint16_t i = 0; i < RX_BUFS; i++)
		post_rx(i);
	vq_notify(&rxq);

	const char *ipv = cmdline_find(cmdline, NULL, "mmds_ip=");
	if (ipv) {
		for (int i = 0; i < 4; i++) {
			uint64_t b = 0;
			ipv = parse_u64(ipv, &b);
			srv_ip[i] = (uint8_t)b;
			if (*ipv == '.')
				ipv++;
		}
	}
	if (arp() != 0) {
		puts_serial("mmds: no arp reply\n");
		return;
	}
	kprintf("mmds: arp %02x:%02x:%02x:%02x:%02x:%02x\n", srv_mac[0], srv_mac[1], srv_mac[2], srv_mac[3],
		srv_mac[4], srv_mac[5]);
	const char *script = cmdline_find(cmdline, NULL, "mmds_script=");
	if (script && memcmp(script, "v2", 2) == 0)
		script_v2();
	else if (script && memcmp(script, "bench", 5) == 0)
		script_bench(cmdline);
	else
		script_v1();
}
