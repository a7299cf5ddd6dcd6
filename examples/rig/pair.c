/* pair: one program, two roles, for examples/rig/test_pair.py.
 *   pair serve      accept one connection, write "hello from <my id>" into it
 *   pair ask TID    connect to PD TID (IPC, READ), print what it sent: "got: ..." */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bmi_client.h"

int main(int argc, char **argv)
{
    int chan = bmi_channel_fd(), fd = -1, peer = 0, mode = 0;
    char type[16], text[128];
    if (chan < 0 || argc < 2) { fprintf(stderr, "pair: not a PD, or no role\n"); return 2; }
    if (strcmp(argv[1], "serve") == 0) {
        if (bmi_accept(chan, 10000, &peer, type, sizeof type, &mode, &fd) != 0) { puts("no peer"); return 1; }
        int n = snprintf(text, sizeof text, "hello from %d", bmi_my_id(chan));
        if (write(fd, text, (size_t)n) != n) return 1;
        printf("served %d\n", peer);
        return 0;
    }
    if (strcmp(argv[1], "ask") == 0 && argc == 3) {
        if (bmi_connect(chan, atoi(argv[2]), "IPC", 1, 0, &fd) != 0) { puts("refused"); return 1; }
        ssize_t n = read(fd, text, sizeof text - 1);
        if (n <= 0) return 1;
        text[n] = 0;
        printf("got: %s\n", text);
        return 0;
    }
    fprintf(stderr, "pair: unknown role %s\n", argv[1]);
    return 2;
}
