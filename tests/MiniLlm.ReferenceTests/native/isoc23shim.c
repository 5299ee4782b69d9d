#include <stdlib.h>
/* glibc 2.38's C23 strtoul differs from strtoul only in accepting a 0b prefix, which libstdc++ never relies on here. */
unsigned long __isoc23_strtoul(const char *s, char **end, int base) { return strtoul(s, end, base); }
