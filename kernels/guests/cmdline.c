/* Command line: copied once at boot, then looked up as space-separated key=value. */
#include "guest.h"

char boot_command_line[COMMAND_LINE_SIZE];

void cmdline_copy(const char *src)
{
	size_t i = 0;
	if (src)
		for (; i < COMMAND_LINE_SIZE - 1 && src[i]; i++)
			boot_command_line[i] = src[i];
	boot_command_line[i] = 0;
}

/* Finds "key=value" (or a bare "key", giving ""); the last occurrence wins. */
bool cmdline_get(const char *key, char *val, size_t size)
{
	size_t klen = strlen(key);
	const char *p = boot_command_line;
	bool found = false;

	while (*p) {
		while (*p == ' ')
			p++;
		const char *tok = p;
		while (*p && *p != ' ')
			p++;
		size_t tlen = (size_t)(p - tok);
		if (tlen >= klen && !strncmp(tok, key, klen) &&
		    (tlen == klen || tok[klen] == '=')) {
			const char *v = tlen == klen ? tok + klen : tok + klen + 1;
			size_t n = (size_t)(p - v);
			if (n >= size)
				n = size - 1;
			memcpy(val, v, n);
			val[n] = 0;
			found = true;
		}
	}
	return found;
}

/* Decimal or 0x-hex; a malformed number ends the guest with EXIT_BAD_CMDLINE. */
u64 cmdline_u64(const char *key, u64 dflt)
{
	char buf[32];
	if (!cmdline_get(key, buf, sizeof(buf)) || !buf[0])
		return dflt;
	u64 v = 0;
	const char *s = buf;
	u32 base = 10;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		goto bad;
	for (; *s; s++) {
		u32 d;
		if (*s >= '0' && *s <= '9')
			d = (u32)(*s - '0');
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = (u32)(*s - 'a' + 10);
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = (u32)(*s - 'A' + 10);
		else
			goto bad;
		v = v * base + d;
	}
	return v;
bad:
	printf_serial("vmm-guest: bad number in %s=%s\n", key, buf);
	guest_exit(EXIT_BAD_CMDLINE);
}
