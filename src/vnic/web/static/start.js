// Starts the app once every page has registered (a file of its own: the
// Content-Security-Policy allows no inline script).
"use strict";
vnic.start();
