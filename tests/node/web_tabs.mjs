// Two tabs of one browser (one profile, shared localStorage) through several access-token
// refreshes: refresh tokens rotate and reusing a spent one ends the login, so the tabs must
// not both spend the same one. The refresh token lives only in an HttpOnly cookie scoped to
// /auth/refresh: never in localStorage, never in document.cookie. A login an older page saved
// with its refresh token in localStorage is moved into the cookie.
//   node web_tabs.mjs '<json config>'   config: {url, handle, password, waitMs}
// Prints one JSON line; exits 0 when both tabs are still signed in and live afterwards.
import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2]);
const result = { steps: [] };
let browser;

async function finish(ok, reason) {
  console.log(JSON.stringify({ ok, reason, ...result }));
  if (browser) await browser.close().catch(() => {});
  process.exit(ok ? 0 : 1);
}
setTimeout(() => finish(false, `timed out after steps ${result.steps.join(", ")}`), config.waitMs + 40000);

try {
  browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true, args: ["--no-sandbox"] });
  const context = await browser.newContext();
  const first = await context.newPage();
  await first.goto(`${config.url}/`);
  await first.getByLabel("Handle").fill(config.handle);
  await first.getByLabel("Password", { exact: true }).fill(config.password);
  await first.getByRole("button", { name: "Log in" }).click();
  await first.locator("#connection", { hasText: "live" }).waitFor();
  const second = await context.newPage();
  await second.goto(`${config.url}/`);
  await second.locator("#connection", { hasText: "live" }).waitFor();
  result.steps.push("two tabs signed in");

  // Where the refresh token is (and is not).
  const refreshCookie = async () => (await context.cookies()).find((c) => c.name === "segue_refresh");
  const cookie = await refreshCookie();
  if (!cookie) throw new Error("no refresh cookie after login");
  if (!cookie.httpOnly || !cookie.secure || cookie.sameSite !== "Strict" || cookie.path !== "/auth/refresh") {
    throw new Error(`refresh cookie attributes: ${JSON.stringify({ ...cookie, value: "…" })}`);
  }
  const scriptSees = async (page) => page.evaluate(() => JSON.stringify({ storage: { ...localStorage }, cookie: document.cookie }));
  const exposed = async (value) => {
    for (const page of [first, second]) {
      const seen = await scriptSees(page);
      if (seen.includes(value) || seen.includes("refresh_token")) throw new Error(`a script can read the refresh token: ${seen}`);
    }
  };
  await exposed(cookie.value);
  result.steps.push("the refresh token is out of scripts' reach");

  const refreshes = [];
  context.on("response", (response) => {
    if (response.url().endsWith("/auth/refresh")) refreshes.push(response.status());
  });
  await first.waitForTimeout(config.waitMs);
  result.refreshes = refreshes;
  if (refreshes.length < 2) throw new Error(`only ${refreshes.length} refreshes happened`);
  if (refreshes.some((status) => status !== 200)) throw new Error(`a refresh failed: ${refreshes}`);
  const rotated = await refreshCookie();
  if (!rotated || rotated.value === cookie.value) throw new Error("the refresh cookie did not rotate");
  await exposed(rotated.value);
  result.steps.push("tokens refreshed several times from the cookie, every refresh accepted");

  // Both tabs still work: an edit in one shows in the other.
  for (const page of [first, second]) {
    if (!(await page.locator("#login").isHidden())) throw new Error("a tab was signed out");
  }
  await second.getByLabel("Search").fill("Harbour Lights");
  await second.getByRole("button", { name: "Add Harbour Lights to the queue" }).click();
  await first.locator("#now-track", { hasText: "Harbour Lights" }).waitFor();
  result.steps.push("both tabs still signed in and in step");

  // A login saved by an older page, refresh token and all, in a fresh profile.
  const res = await fetch(`${config.url}/auth/login`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ handle: config.handle, password: config.password }),
  });
  const legacy = await res.json();
  if (!legacy.refresh_token) throw new Error(`a body login gave no refresh token: ${JSON.stringify(legacy)}`);
  const older = await browser.newContext();
  const page = await older.newPage();
  await page.goto(`${config.url}/`);
  await page.evaluate((saved) => localStorage.setItem("segue.auth", JSON.stringify(saved)), {
    access_token: legacy.access_token, refresh_token: legacy.refresh_token, user: legacy.user, expires_in: legacy.expires_in,
  });
  await page.reload();
  await page.locator("#connection", { hasText: "live" }).waitFor();
  const moved = (await older.cookies()).find((c) => c.name === "segue_refresh");
  if (!moved || !moved.httpOnly) throw new Error("the saved refresh token was not moved into the cookie");
  const seen = await scriptSees(page);
  if (seen.includes(legacy.refresh_token) || seen.includes("refresh_token") || seen.includes(moved.value)) {
    throw new Error(`the saved refresh token is still readable: ${seen}`);
  }
  result.steps.push("a saved refresh token moved into the cookie");
  await finish(true);
} catch (error) {
  await finish(false, String(error));
}
