'use strict';
// An application for the SDK's tests: every callback logs its call in `calls`; each may be
// replaced by a test (`over`).

function recordingApp(over = {}) {
  const calls = [];
  return {
    calls,
    export: (h, clients) => (calls.push(['export', h, clients]), []),
    import: (h, sessions) => void calls.push(['import', h, sessions.map(([c, b]) => [c, b.toString()])]),
    commit: (h) => void calls.push(['commit', h]),
    abort: (h) => void calls.push(['abort', h]),
    ...over,
  };
}

module.exports = { recordingApp };
