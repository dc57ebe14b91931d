'use strict';
// redirector-sdk: the application side of redirector's session hook for Node.js (README.md).

const { attach, Hook, VERSION } = require('./lib/hook');
const { normalizeClient } = require('./lib/client');

module.exports = { attach, Hook, VERSION, normalizeClient };
