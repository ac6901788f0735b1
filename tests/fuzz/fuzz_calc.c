/* fuzz_calc.c — libFuzzer harness for the calculator skill's parser, which
 * reads whatever the model writes. Beyond "no crash, no sanitizer report"
 * it checks the contract the skill relies on: a success is finite and
 * formats into AQ_CALC_FMT_LEN, an error always leaves a message. */
#include "agentq/calc.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* An exact-size heap copy, so ASan catches any read past `size`. */
    char *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);

    double r = 0;
    char err[128] = "";
    int rc = aq_calc_eval(buf, size, &r, err, sizeof err);
    if (rc == AQ_OK) {
        if (!isfinite(r)) abort();
        char out[AQ_CALC_FMT_LEN + 1];
        memset(out, 'x', sizeof out);
        aq_calc_format(r, out, AQ_CALC_FMT_LEN);
        if (strlen(out) >= AQ_CALC_FMT_LEN - 1) abort(); /* it never fills the buffer */
    } else if (rc != AQ_EINVAL || err[0] == '\0') {
        abort();
    }
    free(buf);
    return 0;
}
