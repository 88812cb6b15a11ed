/* Pod sandbox ("pause") process for the containerd test fixture: holds the pod's
 * namespaces open and exits 0 on SIGTERM or SIGINT. Built static, so the image needs
 * nothing but this binary. Also reaps orphans, as PID 1 of the pod should. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(void) {
    signal(SIGTERM, quit);
    signal(SIGINT, quit);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
