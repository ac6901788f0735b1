/* fuzz_duration.c — libFuzzer harness for the reader of a provider's
 * x-ratelimit-reset-* headers ("6m0s", "1.5s", "20ms"), text any provider
 * or proxy on the path may send. Beyond "no crash, no sanitizer report"
 * it checks the contract the router relies on: the answer is -1 or a
 * duration from 0 to 10^12 ms, and the same text always reads the same. */
#include "agentq/llm.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A header value is a C string: an exact-size heap copy with its NUL,
     * so ASan catches a read past it. */
    char *buf = malloc(size + 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);
    buf[size] = '\0';
    int64_t ms = aq_llm_parse_duration(buf);
    if (ms < -1 || ms > 1000000000000LL) abort();
    if (aq_llm_parse_duration(buf) != ms) abort();
    free(buf);
    return 0;
}
