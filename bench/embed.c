/* bench/embed.py's C side: the first call into libbmi (the interpreter starts), then the
 * median of CALLS bmi_get_current_status on one PD, in microseconds. */
#include <bmi.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int calls = argc > 1 ? atoi(argv[1]) : 2000;
    double t = now();
    bmi_get_version(NULL);                       /* fails at once, after starting the interpreter */
    double first = now() - t;
    bmi_manager *m = bmi_open("linux:///session");
    int64_t pd = m ? bmi_allocate_pd(m, 16 << 20, 1, 100) : -1;
    if (pd < 0) {
        fprintf(stderr, "bench: %s\n", bmi_last_error());
        return 1;
    }
    double *times = malloc(sizeof *times * calls);
    for (int i = 0; i < calls; i++) {
        t = now();
        bmi_get_current_status(m, pd);
        times[i] = now() - t;
    }
    qsort(times, calls, sizeof *times, by_value);
    printf("%.1f %.2f\n", first * 1e6, times[calls / 2] * 1e6);
    free(times);
    bmi_close(m);
    return 0;
}
